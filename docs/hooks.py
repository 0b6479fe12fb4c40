"""MkDocs hook: the configuration-key and preset references, generated from the code at every build.

A page holds a marker (``<!-- mrivq:config-keys -->`` or ``<!-- mrivq:presets -->``) that this hook replaces
with a table built from :data:`mrivq.config.schema.SCHEMA` (every key and what it accepts), the defaults
(:mod:`mrivq.config.defaults`, the ``Preprocess`` dataclass, the model constructors) and ``configs/*.yaml``
(what each preset sets). Descriptions come from the same places: the models' docstrings (``Args:``), the
``Preprocess`` fields' comments, and :data:`NOTES` below for the training keys. A key added to the schema
therefore appears in the reference without anyone editing a page; ``tests/docs`` checks that it does.
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KEYS_MARKER = "<!-- mrivq:config-keys -->"
CLI_MARKER = "<!-- mrivq:cli -->"
PRESETS_MARKER = "<!-- mrivq:presets -->"

#: What the keys mean where no docstring or field comment says it (training schedules, caches, top level).
NOTES: dict[str, str] = {
    "preset": "the preset this config was built from (recorded in the run's config)",
    "prior_preset": "the prior preset that `mrivq train` uses for stage 2 with this VQ-VAE preset",
    "base": "a preset or config file this one extends (its keys first, then this file's)",
    "data.modalities": "modalities to train on, in channel order (`--modality`)",
    "data.condition_on": "a manifest column (e.g. `site`, `modality`) whose values become the prior's classes",
    "data.covariates": "numeric manifest columns (e.g. `[age]`) the prior is conditioned on, standardised",
    "data.max_subjects": "use at most this many subjects (after the split is fixed)",
    "data.max_val_subjects": "validate on at most this many subjects",
    "batch_size": "the global batch: every step's batch, split across torchrun processes",
    "lr": "peak learning rate (Adam)",
    "max_steps": "training steps; with `epochs` unset, this is the length of the stage",
    "epochs": "training length in passes over the training set (instead of `max_steps`)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "min_lr_ratio": "the cosine schedule ends at this fraction of `lr`",
    "weight_decay": "Adam weight decay",
    "grad_clip": "clip the gradient norm at this value (0: off)",
    "val_every": "validate every this many steps",
    "ckpt_every": "write `*_last.pt` every this many steps",
    "log_every": "write a `metrics.jsonl` line every this many steps",
    "amp": "mixed precision: `auto` (bf16 where the GPU computes it natively, fp16 with a scaler on older "
           "GPUs, off on the CPU), `bf16`, `fp16` or `off`",
    "seed": "random seed of the split, the initialisation and the batches",
    "train.preview_every": "write a preview picture every this many steps (null: at validation)",
    "train.val_fraction": "share of subjects held out for validation when the run is created",
    "train.cache": "preprocessed volumes kept in `memory`, on `disk` (MONAI's `PersistentDataset`, reused by "
                   "later commands) or not at all (`none`)",
    "train.recon_loss": "the reconstruction loss, `mse` or `l1`",
    "train.threads": "torch CPU threads (null: every core)",
    "train.workers": "DataLoader worker processes (`auto`: 4 on a GPU, none on the CPU)",
    "train.cache_dtype": "`float16` halves the cache in memory and on disk; items still come out float32",
    "train.cache_workers": "threads that fill the cache (`auto`: every core)",
    "train.adversarial_weight": "weight of a least-squares patch-discriminator loss (0: off)",
    "train.adversarial_start": "the step from which the adversarial loss is on",
    "train.disc_channels": "the patch discriminator's first-layer channels",
    "train.disc_layers": "the patch discriminator's layers",
    "train.disc_lr": "the discriminator's learning rate (null: `lr`)",
    "prior.model.family": "`pixelcnn` (autoregressive, the default) or `maskgit` (parallel decoding)",
}


class _Sentinel:
    """A value no check accepts, so that a check returns what it expects ("an integer >= 1")."""


def _walk(schema: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, spec in schema.items():
        if isinstance(spec, dict):
            rows += _walk(spec, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", spec))
    return rows


def config_keys() -> list[str]:
    """Every dotted key of the config schema, in schema order."""
    from mrivq.config.schema import SCHEMA

    return [key for key, _ in _walk(SCHEMA)]


def _accepts(spec: Any) -> str:
    why = spec(_Sentinel())
    return why if why else "any value (checked where it is used)"


def _args_docs(cls: type) -> dict[str, str]:
    """``Args:`` entries of a Google-style class docstring; ``a, b, c: see X`` gives each name."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.M)
    if not m:
        return out
    names: list[str] = []
    for line in m.group(1).splitlines():
        if re.match(r"^    \S", line):  # a new entry: ``name: text`` (a line without one ends the last)
            head = re.match(r"^    ([\w, ]+?):\s+(.*)$", line)
            names = [n.strip() for n in head.group(1).split(",") if n.strip()] if head else []
            for n in names:
                out[n] = head.group(2).strip()
        elif line.strip() and names:
            for n in names:
                out[n] += " " + line.strip()
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """The inline comment on each dataclass field line (``name: type = default  # what it is``)."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, flags=re.M)}


def _signature_defaults(cls: type) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _defaults_and_docs() -> tuple[dict[str, Any], dict[str, str]]:
    from dataclasses import MISSING, fields

    from mrivq.config.defaults import PRIOR_TRAIN_DEFAULTS, TRAIN_DEFAULTS
    from mrivq.data.preprocess import Preprocess
    from mrivq.models.maskgit import MaskedTokenPrior
    from mrivq.models.pixelcnn import GatedPixelCNN
    from mrivq.models.quantizer import VectorQuantizerEMA
    from mrivq.models.vqvae import VQVAE

    defaults: dict[str, Any] = {}
    docs: dict[str, str] = {}
    for f in fields(Preprocess):
        if f.default is not MISSING:
            defaults[f"data.{f.name}"] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            defaults[f"data.{f.name}"] = f.default_factory()  # type: ignore[misc]
    docs.update({f"data.{k}": v for k, v in _field_comments(Preprocess).items()})
    vq_docs = {**_args_docs(VectorQuantizerEMA), **{k: v for k, v in _args_docs(VQVAE).items()
                                                     if not v.startswith("see ")}}
    defaults.update({f"model.{k}": v for k, v in _signature_defaults(VQVAE).items()})
    docs.update({f"model.{k}": v for k, v in vq_docs.items()})
    for cls in (MaskedTokenPrior, GatedPixelCNN):  # the PixelCNN's value wins where both have a key
        defaults.update({f"prior.model.{k}": v for k, v in _signature_defaults(cls).items()})
        docs.update({f"prior.model.{k}": v for k, v in _args_docs(cls).items()})
    defaults.update({f"train.{k}": v for k, v in TRAIN_DEFAULTS.items()})
    defaults.update({f"prior.train.{k}": v for k, v in PRIOR_TRAIN_DEFAULTS.items()})
    defaults.setdefault("prior.model.family", "pixelcnn")
    return defaults, docs


def _fmt(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def _cell(text: str) -> str:
    """Docstring markup as Markdown (``x`` and :class:`x` as `x`), on one table row."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return text.replace("|", "\\|").replace("\n", " ")


def _note(key: str, docs: dict[str, str]) -> str:
    short = key.rsplit(".", 1)[-1]
    return docs.get(key) or NOTES.get(key) or NOTES.get(short, "")


def presets() -> dict[str, dict]:
    """``configs/*.yaml`` by name, each with its parsed keys and its leading comment."""
    out: dict[str, dict] = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text()
        lead = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            lead.append(line.lstrip("# ").rstrip())
        out[path.stem] = {"config": yaml.safe_load(text) or {}, "about": " ".join(lead)}
    return out


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_keys_markdown() -> str:
    """One table per section: key, what it accepts, its default, which presets set it, what it does."""
    from mrivq.config.schema import SCHEMA

    defaults, docs = _defaults_and_docs()
    set_by: dict[str, list[str]] = {}
    for name, p in presets().items():
        for key in _flatten(p["config"]):
            set_by.setdefault(key, []).append(name)
    sections: dict[str, list[str]] = {}
    for key, spec in _walk(SCHEMA):
        section = key.rsplit(".", 1)[0] if "." in key else "(top level)"
        default = _fmt(defaults[key]) if key in defaults else ""
        by = ", ".join(f"`{n}`" for n in set_by.get(key, []))
        sections.setdefault(section, []).append(
            f"| `{key}` | {_cell(_accepts(spec))} | {_cell(default)} | {by} | {_cell(_note(key, docs))} |")
    parts = []
    for section, rows in sections.items():
        parts += [f"### `{section}`" if section != "(top level)" else "### Top level", "",
                  "| key | accepts | default | set by presets | what it does |", "| --- | --- | --- | --- | --- |",
                  *rows, ""]
    return "\n".join(parts)


def presets_markdown() -> str:
    """The shipped presets: name, what its own comment says, and the keys it sets."""
    rows = ["| preset | what it is for | keys it sets |", "| --- | --- | --- |"]
    for name, p in presets().items():
        keys = ", ".join(f"`{k}`" for k in _flatten(p["config"]))
        rows.append(f"| `{name}` | {_cell(p['about'])} | {_cell(keys)} |")
    return "\n".join(rows) + "\n"


def cli_commands() -> list[str]:
    """Every command path of the ``mrivq`` command line (``mrivq``, ``mrivq train``, ``mrivq datasets show``)."""
    import typer

    from mrivq.cli.app import app

    def walk(cmd: Any, path: str) -> list[str]:  # typer's own click: a group is what has ``commands``
        found = [path]
        for name, sub in getattr(cmd, "commands", {}).items():
            found += walk(sub, f"{path} {name}")
        return found

    return walk(typer.main.get_command(app), "mrivq")


def cli_markdown() -> str:
    """The command-line reference: typer's own Markdown docs of the ``mrivq`` app (what ``typer
    mrivq.cli.app utils docs`` prints), every heading one level down so that the page keeps its title."""
    import typer
    from typer.cli import get_docs_for_click

    from mrivq.cli.app import app

    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command), name="mrivq")
    lines, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001 - mkdocs API
    """Replace the reference markers with the generated tables."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if KEYS_MARKER in markdown:
        markdown = markdown.replace(KEYS_MARKER, config_keys_markdown())
    if PRESETS_MARKER in markdown:
        markdown = markdown.replace(PRESETS_MARKER, presets_markdown())
    return markdown


__all__ = ["cli_commands", "cli_markdown", "config_keys", "config_keys_markdown", "on_page_markdown", "presets",
           "presets_markdown"]


class _GroupedParams(logging.Filter):
    """Drop griffe's warnings about a docstring entry that documents several parameters at once
    (``commitment_cost, decay, ...: see VectorQuantizerEMA``): the project's docstrings use that form, which
    griffe's Google parser reads as one unknown parameter. Every other warning still fails a strict build."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        grouped = re.search(r"(Failed to get 'name: description' pair from|parameter) '[\w ]+,", msg, flags=re.I)
        return not grouped


def on_startup(command: str, dirty: bool) -> None:  # noqa: ARG001 - mkdocs API
    for name in ("mkdocs.plugins.griffe", "griffe", "mkdocs.plugins.mkdocstrings_handlers.python"):
        logging.getLogger(name).addFilter(_GroupedParams())
