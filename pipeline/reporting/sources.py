"""Everything a report is built from (manifest.json and the stage result files), read once."""
from __future__ import annotations

from rexport.core.errors import InputError
from rexport.core.fsio import read_json
from rexport.pipeline.bench import RESULTS_FILE
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.summaries import ExportSummary, ImportSummary, Summary, summary_class
from rexport.pipeline.variants import engine_dirs


class Sources:
    """Everything the report is built from, read once; ``problems`` collects what could not be read."""

    def __init__(self, run: RunDir) -> None:
        if not run.exists():
            raise InputError(f"no manifest.json in {run.path}", "run 'rexport export' first (or pass --out)")
        self.run = run
        self.manifest = run.manifest
        self.stages: dict[str, dict] = self.manifest.get("stages", {})
        self.problems: list[str] = []
        self._summaries: dict[str, Summary | None] = {}
        self.used_files: list[str] = []
        self.validate = self._read_dir("validate")
        self.evaluate = self._read_dir("eval")
        self.bench = self._read(RESULTS_FILE) if run.file(RESULTS_FILE).exists() else None
        self.sidecars = {}
        for name, d in engine_dirs(run).items():
            sc = self._read(str((d / "sidecar.json").relative_to(run.path)))
            if sc is not None:
                self.sidecars[name] = sc

    def _read(self, rel: str) -> dict | None:
        try:
            data = read_json(self.run.file(rel))
        except (OSError, ValueError) as e:
            self.problems.append(f"{rel} is unreadable ({type(e).__name__}); its numbers are left out")
            return None
        if not isinstance(data, dict):
            self.problems.append(f"{rel} is not a JSON object; its numbers are left out")
            return None
        self.used_files.append(rel)
        return data

    def read(self, rel: str) -> dict | None:
        """A result file (relative to the run dir) as a dict, recorded in the report's sources; None if
        absent. Unreadable files are reported as problems, never raised."""
        return self._read(rel) if self.run.file(rel).exists() else None

    def read_dir(self, folder: str) -> dict[str, dict]:
        """Every ``folder/*.json`` by its variant (or file stem)."""
        return self._read_dir(folder)

    def _read_dir(self, folder: str) -> dict[str, dict]:
        out = {}
        d = self.run.file(folder)
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                data = self._read(f"{folder}/{p.name}")
                if data is not None:
                    out[data.get("variant") or p.stem] = data
        return out

    def summary(self, stage: str) -> Summary | None:
        """The typed summary of a manifest stage, None when it has none; a record this version cannot read
        is reported as a problem (the report still builds), never raised."""
        if stage not in self._summaries:
            cls, self._summaries[stage] = summary_class(stage), None
            try:
                self._summaries[stage] = cls.from_stage(self.stages.get(stage), stage=stage) if cls else None
            except InputError as e:
                self.problems.append(f"{e.message}; its figures are left out")
        return self._summaries[stage]

    @property
    def export_summary(self) -> ExportSummary | ImportSummary | None:
        return self.summary("export" if "export" in self.stages else "import")

    @property
    def export(self) -> dict:
        return self.stages.get("export") or self.stages.get("import") or {}   # import: a run from an ONNX file

    @property
    def random_weights(self) -> bool:
        s = self.export_summary
        if s is not None and s.random_weights is not None:
            return bool(s.random_weights)
        return self.export.get("settings", {}).get("weights") is None  # the oldest runs: no random_weights

