"""The erasure spec (TOML): what to erase, what to keep, how to check it.

Every key is validated on load, so a typo is a one-line error naming the key instead of a
silently ignored setting.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher.errors import PatcherError

FAMILIES = ("auto", "causal-lm", "t2i-unet", "classifier")
GATE_KEYS = (
    "max_forget_accuracy",
    "max_paraphrase_accuracy",
    "max_recovery",
    "min_retain_ratio",
    "max_perplexity_increase",
)
# Keys that moved, and where to: named in the error instead of a bare "unknown key".
MOVED_KEYS = {"verify.max_attack_accuracy": "[attacks.inversion] max_forget_accuracy"}
# Applied when the spec names held-out text (verify.heldout): at most 5% higher perplexity.
DEFAULT_MAX_PERPLEXITY_INCREASE = 0.05
# Text-to-image verification: which images to generate and who judges them.
IMAGE_CHECK_KEYS = {
    "prompts": list,
    "images_per_prompt": int,
    "guidance_scale": (int, float),
    "inference_steps": int,
    "judge": str,
}
# Object templates in the style of UCE's: a concept is embedded in each.
DEFAULT_TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}")
SCHEMA: dict[str, dict[str, Any]] = {
    "model": {"path": str, "family": str},
    "stats": {"corpus": str, "data": str},
    # The methods' own [erase] keys are declared by their configs (patcher/methods/).
    "erase": {"method": str, "layers": (str, list), "templates": list},
    "verify": {
        "formats": list,
        "data": str,
        "heldout": str,
        **dict.fromkeys(GATE_KEYS, (int, float)),
        **IMAGE_CHECK_KEYS,
    },
    "export": {"formats": list},
}
ENTRY_SCHEMA: dict[str, dict[str, Any]] = {
    "forget": {"prompt": str, "target": str, "subject": str, "paraphrases": list, "replacement": str},
    "retain": {"prompt": str, "target": str},
    "concept": {"erase": str, "anchor": str},
    "preserve": {"concept": str},
    "forget_class": {"label": int},
}
REQUIRED_ENTRY_KEYS = {
    "forget": ("prompt", "target"),
    "retain": ("prompt", "target"),
    "concept": ("erase",),
    "preserve": ("concept",),
    "forget_class": ("label",),
}


@dataclass(frozen=True)
class ForgetFact:
    """A fact the patched model must no longer produce."""

    prompt: str
    target: str
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()
    replacement: str | None = None


@dataclass(frozen=True)
class RetainFact:
    """A fact the patched model must still produce."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Gates:
    """Pass/fail thresholds `patcher verify` applies to every format."""

    max_forget_accuracy: float = 0.05
    max_recovery: float = 0.05
    min_retain_ratio: float = 0.95
    max_paraphrase_accuracy: float | None = None
    max_perplexity_increase: float | None = None  # causal LM: on verify.heldout, against the base


@dataclass(frozen=True)
class ImageChecks:
    """How text-to-image verify generates and grades images: each prompt template filled with
    each concept, `images_per_prompt` fixed seeds, graded by the judge folder."""

    prompts: tuple[str, ...] = ("{}",)
    images_per_prompt: int = 8
    guidance_scale: float = 7.5
    inference_steps: int = 20
    judge: Path | None = None


@dataclass
class Spec:
    """A parsed, validated spec. `raw` is the TOML as read, stored in patches and reports."""

    raw: dict
    folder: Path
    model_path: str | None = None
    family: str = "auto"
    corpus: Path | None = None
    stats_data: Path | None = None  # classifier: labelled training images (an image set)
    eval_data: Path | None = None  # classifier: labelled test images verify grades on
    heldout: Path | None = None  # causal LM: text neither edit nor statistics saw, for perplexity
    method: str = "memit"
    layers: str | list[int] = "auto"
    method_settings: dict[str, Any] = field(default_factory=dict)  # [erase] keys a method's config reads
    forget: list[ForgetFact] = field(default_factory=list)
    retain: list[RetainFact] = field(default_factory=list)
    concepts: list[dict] = field(default_factory=list)
    preserve: list[dict] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    images: ImageChecks = field(default_factory=ImageChecks)
    forget_classes: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=lambda: ["safetensors"])
    export_formats: list[str] = field(default_factory=list)
    gates: Gates = field(default_factory=Gates)
    attacks: dict[str, dict] = field(default_factory=dict)  # [attacks.<name>] tables: budget and gate

    def resolve(self, relative: str) -> Path:
        """A path from the spec, relative to the spec file's folder."""
        return (self.folder / relative).resolve()

    def to_json(self) -> str:
        return json.dumps(self.raw, sort_keys=True)

    def fact_pairs(self) -> list[tuple[str, str]]:
        """Every (prompt, target) edit or verify scores: forget facts, their paraphrases, retain facts."""
        forget = [(f.prompt, f.target) for f in self.forget]
        paraphrases = [(p, f.target) for f in self.forget for p in f.paraphrases]
        return forget + paraphrases + [(r.prompt, r.target) for r in self.retain]


def infer_subject(fact: ForgetFact) -> str:
    """The fact's subject: given, or the longest word run the prompt shares with a paraphrase."""
    if fact.subject:
        return fact.subject
    if not fact.paraphrases:
        raise PatcherError(
            f"forget fact {fact.prompt!r} names no subject and has no paraphrase to infer one "
            'from: add subject = "..." to it'
        )
    words, other = fact.prompt.split(), fact.paraphrases[0].split()
    best: list[str] = []
    for i in range(len(words)):
        for j in range(i + 1, len(words) + 1):
            run = words[i:j]
            if len(run) > len(best) and _contains(other, run):
                best = run
    if not best:
        raise PatcherError(f'cannot infer the subject of {fact.prompt!r}: add subject = "..." to it')
    return " ".join(best)


def _contains(words: list[str], run: list[str]) -> bool:
    return any(words[k : k + len(run)] == run for k in range(len(words) - len(run) + 1))


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; every problem is a PatcherError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise PatcherError(f"spec file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PatcherError(f"{path} is not UTF-8 text: save the spec as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise PatcherError(f"{path} is not valid TOML: {err}") from None
    return parse_spec(raw, path.parent.resolve(), str(path))


def parse_spec(raw: dict, folder: Path, where: str = "spec") -> Spec:
    """Validate a spec dict (as read from TOML) and build a Spec."""
    _validate(raw, where)
    model, stats, erase = raw.get("model", {}), raw.get("stats", {}), raw.get("erase", {})
    verify = raw.get("verify", {})
    family = model.get("family", "auto")
    if family not in FAMILIES:
        raise PatcherError(f"{where}: model.family must be one of {', '.join(FAMILIES)}, not {family!r}")
    spec = Spec(
        raw=raw,
        folder=folder,
        model_path=model.get("path"),
        family=family,
        corpus=(folder / stats["corpus"]).resolve() if "corpus" in stats else None,
        stats_data=(folder / stats["data"]).resolve() if "data" in stats else None,
        eval_data=(folder / verify["data"]).resolve() if "data" in verify else None,
        heldout=(folder / verify["heldout"]).resolve() if "heldout" in verify else None,
        method=erase.get("method", "memit"),
        layers=_layers(erase.get("layers", "auto"), where),
        method_settings={k: v for k, v in erase.items() if k not in SCHEMA["erase"]},
        forget=[_forget(entry) for entry in raw.get("forget", [])],
        retain=[RetainFact(e["prompt"], e["target"]) for e in raw.get("retain", [])],
        concepts=list(raw.get("concept", [])),
        preserve=list(raw.get("preserve", [])),
        templates=_templates(erase.get("templates", list(DEFAULT_TEMPLATES)), "erase.templates", where),
        images=_image_checks(verify, folder, where),
        forget_classes=[e["label"] for e in raw.get("forget_class", [])],
        formats=[str(f) for f in verify.get("formats", ["safetensors"])],
        export_formats=[str(f) for f in raw.get("export", {}).get("formats", [])],
        gates=_gates(verify, where),
        attacks=dict(raw.get("attacks", {})),
    )
    _check_facts(spec, where)
    # Imported here: the methods' and attacks' modules import this one for the Spec they read.
    from patcher.attacks import check_attack_tables
    from patcher.methods import check_erase_keys

    check_erase_keys(spec.method_settings, spec.method, where)
    check_attack_tables(spec.attacks, where)
    return spec


def _gates(verify: dict, where: str) -> Gates:
    gates = {k: float(v) for k, v in verify.items() if k in GATE_KEYS}
    for key, value in gates.items():
        # Accuracies, shares and recovery are fractions; a perplexity increase has no ceiling.
        high = float("inf") if key == "max_perplexity_increase" else 1.0
        if not 0.0 <= value <= high:
            limit = "at least 0" if high == float("inf") else "between 0 and 1"
            raise PatcherError(f"{where}: verify.{key} must be {limit}, not {value}")
    if "heldout" in verify:
        gates.setdefault("max_perplexity_increase", DEFAULT_MAX_PERPLEXITY_INCREASE)
    return Gates(**gates)


def _check_facts(spec: Spec, where: str) -> None:
    """Refuse a prompt asked both to forget and to keep; drop repeated facts with a warning
    (a repeat would count twice in every accuracy)."""
    forget_prompts = {fact.prompt for fact in spec.forget}
    both = [fact.prompt for fact in spec.retain if fact.prompt in forget_prompts]
    if both:
        raise PatcherError(f"{where}: {both[0]!r} is both a [[forget]] and a [[retain]] prompt: keep it in one")
    for name in ("forget", "retain"):
        facts = getattr(spec, name)
        unique, seen = [], set()
        for fact in facts:
            if (fact.prompt, fact.target) not in seen:
                seen.add((fact.prompt, fact.target))
                unique.append(fact)
        if len(unique) < len(facts):
            warnings.warn(f"{where}: {len(facts) - len(unique)} repeated [[{name}]] facts dropped", stacklevel=3)
            setattr(spec, name, unique)


def _forget(entry: dict) -> ForgetFact:
    return ForgetFact(
        prompt=entry["prompt"],
        target=entry["target"],
        subject=entry.get("subject"),
        paraphrases=tuple(str(p) for p in entry.get("paraphrases", [])),
        replacement=entry.get("replacement"),
    )


def _templates(value: list, key: str, where: str) -> list[str]:
    if not value or not all(isinstance(t, str) and t.count("{}") == 1 for t in value):
        raise PatcherError(f'{where}: {key} must be a list of prompts with one "{{}}" where the concept goes')
    return list(value)


def _image_checks(verify: dict, folder: Path, where: str) -> ImageChecks:
    settings = {k: verify[k] for k in IMAGE_CHECK_KEYS if k in verify}
    if "prompts" in settings:
        settings["prompts"] = tuple(_templates(settings["prompts"], "verify.prompts", where))
    if "judge" in settings:
        settings["judge"] = (folder / settings["judge"]).resolve()
    if "guidance_scale" in settings:
        settings["guidance_scale"] = float(settings["guidance_scale"])
    for key in ("images_per_prompt", "inference_steps"):
        if settings.get(key, 1) < 1:
            raise PatcherError(f"{where}: verify.{key} must be at least 1")
    return ImageChecks(**settings)


def _layers(value: str | list, where: str) -> str | list[int]:
    if value == "auto":
        return "auto"
    if isinstance(value, list) and value and all(isinstance(v, int) and v >= 0 for v in value):
        return sorted(set(value))
    raise PatcherError(f'{where}: erase.layers must be "auto" or a list of layer indices, not {value!r}')


def _validate(raw: dict, where: str) -> None:
    for section, value in raw.items():
        if section == "attacks":  # a table of [attacks.<name>] tables, checked against the attacks' budgets
            if not isinstance(value, dict):
                raise PatcherError(f"{where}: [attacks] must hold [attacks.<name>] tables")
        elif section in SCHEMA:
            if not isinstance(value, dict):
                raise PatcherError(f"{where}: [{section}] must be a table")
            if section == "erase":  # its other keys are checked against the methods' configs
                value = {k: v for k, v in value.items() if k in SCHEMA["erase"]}
            _check_table(value, SCHEMA[section], section, where)
        elif section in ENTRY_SCHEMA:
            if not isinstance(value, list):
                raise PatcherError(f"{where}: {section} must be written as [[{section}]] entries")
            for i, entry in enumerate(value):
                name = f"{section}[{i}]"
                if not isinstance(entry, dict):
                    raise PatcherError(f"{where}: {name} must be a table: write it as [[{section}]] and its keys")
                _check_table(entry, ENTRY_SCHEMA[section], name, where)
                for key in REQUIRED_ENTRY_KEYS[section]:
                    if key not in entry:
                        raise PatcherError(f"{where}: {name} needs a {key!r} key")
        else:
            known = ", ".join([*SCHEMA, "attacks", *ENTRY_SCHEMA])
            raise PatcherError(f"{where}: unknown section {section!r}; known sections: {known}")


def _check_table(table: dict, schema: dict[str, Any], name: str, where: str) -> None:
    for key, value in table.items():
        if f"{name}.{key}" in MOVED_KEYS:
            raise PatcherError(f"{where}: '{name}.{key}' is now {MOVED_KEYS[f'{name}.{key}']}: set it there")
        if key not in schema:
            raise PatcherError(f"{where}: unknown key '{name}.{key}'; known keys of {name}: {', '.join(schema)}")
        expected = schema[key]
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise PatcherError(f"{where}: '{name}.{key}' has the wrong type ({type(value).__name__})")


def dump_spec(raw: dict) -> str:
    """Write a spec dict as TOML (tables and their sub-tables, arrays of tables, strings,
    numbers, lists)."""
    lines: list[str] = []
    for section, value in raw.items():
        if isinstance(value, dict):
            lines += _table(section, value)
        else:
            for entry in value:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
                lines.append("")
    return "\n".join(lines)


def _table(name: str, table: dict) -> list[str]:
    """`[name]` with its keys, then each sub-table as `[name.key]`."""
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)] + [""]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += _table(f"{name}.{key}", value)
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
