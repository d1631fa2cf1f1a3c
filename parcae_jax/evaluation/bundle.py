"""The DCLM/nanochat evaluation bundle and the CORE / Core-Extended task lists (PARCAE_SPEC §9.2).

Bundle layout (a local folder; `download_bundle` fetches the public zip when there is network):

    BUNDLE/core.yaml                       icl_tasks: label, dataset_uri, num_fewshot: [k],
                                           icl_task_type, continuation_delimiter (default " ")
    BUNDLE/eval_meta_data.csv              columns "Eval Task", ..., "Random baseline" (percent)
    BUNDLE/eval_data/<category>/<task>.jsonl

`core` evaluates the 22 CORE tasks with the settings of the bundle's own core.yaml (the built-in
table below is used only for a CORE task the yaml does not list); `core_extended` uses the built-in
46-task list, as the official Core-Extended does. A task whose jsonl is absent is reported missing.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile
import urllib.request
import zipfile

import yaml

from parcae_jax.errors import ConfigError, UserError

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_BUNDLE_DIR = "~/.cache/parcae_jax/eval_bundle"
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# Official Core-Extended: a task absent from eval_meta_data.csv is centred with a 25 % baseline.
DEFAULT_BASELINE = 25.0


class BundleError(UserError, ValueError):
    """The evaluation bundle is missing or malformed (message names the file and the fix)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str  # relative to BUNDLE/eval_data
    num_fewshot: int
    task_type: str  # one of TASK_TYPES
    delimiter: str = " "

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _spec(label, category, shots, kind, delimiter=" ", file=None):
    """A built-in task: data at `category/<file or label>.jsonl`; kind MC / LM / schema."""
    kind = {"MC": "multiple_choice", "LM": "language_modeling", "schema": "schema"}[kind]
    return TaskSpec(label, f"{category}/{file or label}.jsonl", shots, kind, delimiter)


WK, CR, LU = "world_knowledge", "commonsense_reasoning", "language_understanding"
SP, RC, SAFETY = "symbolic_problem_solving", "reading_comprehension", "safety"
ANSWER = "\nAnswer: "
CORE_TASKS: tuple[TaskSpec, ...] = (
    _spec("hellaswag_zeroshot", LU, 0, "MC", file="hellaswag"),
    _spec("jeopardy", WK, 10, "LM", ANSWER, file="jeopardy_all"),
    _spec("bigbench_qa_wikidata", WK, 10, "LM"),
    _spec("arc_easy", WK, 10, "MC", ANSWER),
    _spec("arc_challenge", WK, 10, "MC", ANSWER),
    _spec("copa", CR, 0, "MC"),
    _spec("commonsense_qa", CR, 10, "MC"),
    _spec("piqa", CR, 10, "MC", ANSWER),
    _spec("openbook_qa", CR, 0, "MC"),
    _spec("lambada_openai", LU, 0, "LM"),
    _spec("hellaswag", LU, 10, "MC"),
    _spec("winograd", LU, 0, "schema", file="winograd_wsc"),
    _spec("winogrande", LU, 0, "schema"),
    _spec("bigbench_dyck_languages", SP, 10, "LM"),
    _spec("agi_eval_lsat_ar", SP, 3, "MC"),
    _spec("bigbench_cs_algorithms", SP, 10, "LM"),
    _spec("bigbench_operators", SP, 10, "LM"),
    _spec("bigbench_repeat_copy_logic", SP, 10, "LM"),
    _spec("squad", RC, 10, "LM"),
    _spec("coqa", RC, 0, "LM"),
    _spec("boolq", RC, 10, "MC", ANSWER),
    _spec("bigbench_language_identification", LU, 10, "MC"),
)
EXTENDED_ONLY_TASKS: tuple[TaskSpec, ...] = (
    _spec("mmlu_zeroshot", WK, 0, "MC", "Answer: ", file="mmlu"),
    _spec("mmlu_fewshot", WK, 5, "MC", ANSWER, file="mmlu"),
    _spec("siqa", CR, 10, "MC"),
    _spec("bigbench_misconceptions", WK, 10, "MC"),
    _spec("bigbench_novel_concepts", CR, 10, "MC"),
    _spec("bigbench_strange_stories", CR, 10, "MC"),
    _spec("bigbench_strategy_qa", CR, 10, "MC"),
    _spec("bigbench_conlang_translation", LU, 0, "LM"),
    _spec("bigbench_conceptual_combinations", LU, 10, "MC"),
    _spec("bigbench_elementary_math_qa", SP, 10, "MC"),
    _spec("bigbench_logical_deduction", SP, 10, "MC"),
    _spec("simple_arithmetic_nospaces", SP, 10, "LM"),
    _spec("simple_arithmetic_withspaces", SP, 10, "LM"),
    _spec("math_qa", SP, 10, "MC"),
    _spec("logi_qa", SP, 10, "MC", ANSWER),
    _spec("pubmed_qa_labeled", RC, 10, "LM"),
    _spec("agi_eval_lsat_rc", RC, 3, "MC"),
    _spec("agi_eval_lsat_lr", RC, 3, "MC"),
    _spec("bigbench_understanding_fables", RC, 10, "MC"),
    _spec("agi_eval_sat_en", RC, 3, "MC"),
    _spec("winogender_mc_female", SAFETY, 10, "MC"),
    _spec("winogender_mc_male", SAFETY, 10, "MC"),
    _spec("enterprise_pii_classification", SAFETY, 10, "MC"),
    _spec("bbq", SAFETY, 3, "MC"),
)
CORE_EXTENDED_TASKS = CORE_TASKS + EXTENDED_ONLY_TASKS
CORE_LABELS = tuple(t.label for t in CORE_TASKS)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """A local bundle folder: task settings from core.yaml, random baselines from the CSV, data files."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(os.path.expanduser(str(root))).resolve()
        if not self.root.is_dir():
            raise BundleError(
                f"evaluation bundle {self.root} does not exist; pass --config.bundle_dir=PATH (a folder "
                "with core.yaml, eval_meta_data.csv and eval_data/), or --config.download_bundle=True"
            )
        self.data_dir = self.root / "eval_data"
        if not self.data_dir.is_dir():
            raise BundleError(f"{self.root} has no eval_data/ folder: not an evaluation bundle")
        self.baselines = self._read_baselines()
        self.yaml_tasks = self._read_core_yaml()

    def _read_baselines(self) -> dict[str, float]:
        path = self.root / "eval_meta_data.csv"
        if not path.is_file():
            raise BundleError(f"{path} not found: the bundle's random baselines are needed for centring")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and ("Eval Task" not in rows[0] or "Random baseline" not in rows[0]):
            raise BundleError(
                f"{path}: expected columns 'Eval Task' and 'Random baseline', got {list(rows[0])}"
            )
        return {r["Eval Task"].strip(): float(r["Random baseline"]) for r in rows}

    def _read_core_yaml(self) -> dict[str, TaskSpec]:
        path = self.root / "core.yaml"
        if not path.is_file():
            return {}
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        out = {}
        for entry in doc.get("icl_tasks", []):
            shots = entry.get("num_fewshot", [0])
            spec = TaskSpec(
                label=entry["label"],
                dataset_uri=entry["dataset_uri"],
                num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                task_type=entry["icl_task_type"],
                delimiter=entry.get("continuation_delimiter", " "),
            )
            if spec.task_type not in TASK_TYPES:
                raise BundleError(f"{path}: task {spec.label!r} has unknown icl_task_type {spec.task_type!r}")
            out[spec.label] = spec
        return out

    def suite(self, name: str) -> list[TaskSpec]:
        """The task settings of `core` (bundle yaml first) or `core_extended` (built-in list)."""
        if name == "core":
            return [self.yaml_tasks.get(t.label, t) for t in CORE_TASKS]
        if name == "core_extended":
            return list(CORE_EXTENDED_TASKS)
        raise ConfigError(f"unknown task suite {name!r}: expected 'core' or 'core_extended'")

    def data_path(self, spec: TaskSpec) -> pathlib.Path | None:
        """The task's jsonl, or None when the bundle lacks it."""
        path = self.data_dir / spec.dataset_uri
        return path if path.is_file() else None

    def find_file(self, name: str) -> pathlib.Path | None:
        """A data file by name anywhere under eval_data/ (e.g. lambada_openai.jsonl)."""
        hits = sorted(self.data_dir.rglob(name))
        return hits[0] if hits else None

    def baseline(self, label: str) -> tuple[float, str]:
        """(random baseline in percent, where it came from: 'csv' or 'default')."""
        if label in self.baselines:
            return self.baselines[label], "csv"
        return DEFAULT_BASELINE, "default"

    def fingerprint(self, files: list[pathlib.Path]) -> str:
        """sha256 over core.yaml, eval_meta_data.csv and the given data files (names and contents)."""
        digest = hashlib.sha256()
        for path in [self.root / "core.yaml", self.root / "eval_meta_data.csv", *sorted(set(files))]:
            if path.is_file():
                digest.update(str(path.relative_to(self.root)).encode())
                digest.update(file_sha256(path).encode())
        return digest.hexdigest()[:16]


def download_bundle(dest: str | os.PathLike, url: str = EVAL_BUNDLE_URL) -> pathlib.Path:
    """Fetch and unpack the public bundle zip into `dest` (atomically: a temporary sibling is renamed)."""
    dest = pathlib.Path(os.path.expanduser(str(dest))).resolve()
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        archive = tmp / "bundle.zip"
        try:
            urllib.request.urlretrieve(url, archive)
        except OSError as e:
            raise BundleError(
                f"could not download the evaluation bundle from {url} ({e}); download and unzip it by "
                "hand and pass --config.bundle_dir=PATH"
            ) from None
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp / "unpacked")
        unpacked = tmp / "unpacked"
        inner = [p for p in unpacked.iterdir() if p.is_dir()]
        # The zip holds one top folder (eval_bundle/); accept a flat archive too.
        root = inner[0] if len(inner) == 1 and not (unpacked / "core.yaml").exists() else unpacked
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
