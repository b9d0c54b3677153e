"""The report's pieces, one concern each: sources (reading), rows and tables, assembly (the report
dict), plots, details/markdown/html (rendering), and sections/ (extra sections, one module each).
The stage entry point is rexport.pipeline.report."""
