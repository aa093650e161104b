"""Attacks on a patched model, registered by name: each tries one way back to the erased
knowledge within a budget the spec states, and verify gates what came back.

An attack is one module that decorates its function with `register`; its budget is a
dataclass of `setting` fields, the keys of the spec's `[attacks.<name>]` table. Beside the
budget, every table takes the attack's gate, `max_<figure>` for the figure it gates:
`max_forget_accuracy` for most (default: the spec's `verify.max_forget_accuracy`), so
"passed" always means "passed against this much effort".
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from patcher.errors import PatcherError
from patcher.settings import parse_config, setting_types
from patcher.spec import Spec

FORGET_ACCURACY = "forget_accuracy"


@dataclass
class AttackInputs:
    """What an attack may read: the base and the patched model (full precision, never
    modified: an attack that trains works on its own copy; for text-to-image, the two
    pipelines), the spec, a causal LM's tokenizer and a pipeline's image judge. A
    classifier's images are the spec's `[stats]` and `[verify]` data."""

    base: Any
    patched: Any
    tokenizer: Any
    spec: Spec
    judge: Any = None


@dataclass(frozen=True)
class Attack:
    """A registered attack: its function, its budget's dataclass, the families it attacks and
    the figure its gate bounds."""

    name: str
    run: Callable[[AttackInputs, Any], dict]  # returns its figures, the gated one among them
    budget: type
    families: tuple[str, ...]
    description: str  # one line for the report and the model card
    gated: str = FORGET_ACCURACY
    default_limit: float | None = None  # None: the spec's verify.max_forget_accuracy

    @property
    def gate_key(self) -> str:
        """The `[attacks.<name>]` key that bounds the gated figure."""
        return f"max_{self.gated}"

    def limit(self, table: dict[str, Any], spec: Spec) -> float:
        """The gate's bound: the table's, else the attack's default, else verify's forget gate."""
        default = spec.gates.max_forget_accuracy if self.default_limit is None else self.default_limit
        return float(table.get(self.gate_key, default))

    def configure(self, table: dict[str, Any]) -> Any:
        """The budget from the spec's `[attacks.<name>]` table (the gate key aside)."""
        settings = {k: v for k, v in table.items() if k != self.gate_key}
        return parse_config(self.budget, settings, self.name, f"attacks.{self.name}")


ATTACKS: dict[str, Attack] = {}


def register(
    name: str,
    budget: type,
    families: tuple[str, ...],
    description: str,
    gated: str = FORGET_ACCURACY,
    default_limit: float | None = None,
):
    """Add the decorated function to the registry as attack `name` (a `--attacks` value),
    gated on its `gated` figure (at most `default_limit` unless the spec says otherwise)."""

    def decorate(run: Callable[[AttackInputs, Any], dict]) -> Callable[[AttackInputs, Any], dict]:
        ATTACKS[name] = Attack(name, run, budget, families, description, gated, default_limit)
        return run

    return decorate


def attacks_for(family: str) -> list[str]:
    """The registered attacks that run on `family`."""
    return [name for name, attack in ATTACKS.items() if family in attack.families]


def check_attack_tables(tables: dict[str, Any], where: str) -> None:
    """A PatcherError for an `[attacks.<name>]` table naming no attack, with a key its budget
    does not declare, or with a value of the wrong type."""
    for name, table in tables.items():
        if name not in ATTACKS:
            raise PatcherError(f"{where}: unknown attack [attacks.{name}]; known attacks: {', '.join(ATTACKS)}")
        if not isinstance(table, dict):
            raise PatcherError(f"{where}: [attacks.{name}] must be a table of budget keys")
        gate_key = ATTACKS[name].gate_key
        known = [*setting_types(ATTACKS[name].budget), gate_key]
        for key in table:
            if key not in known:
                raise PatcherError(f"{where}: unknown key 'attacks.{name}.{key}'; known keys: {', '.join(known)}")
        gate = table.get(gate_key, 0.0)
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0.0 <= gate <= 1.0:
            raise PatcherError(f"{where}: attacks.{name}.{gate_key} must be a number between 0 and 1")
        try:
            ATTACKS[name].configure(table)
        except PatcherError as err:
            raise PatcherError(f"{where}: {err}") from None


def chosen_attacks(spec: Spec, family: str, names: list[str] | None) -> dict[str, dict]:
    """The attacks to run and their tables: `names` (a `--attacks` list, "all" for every
    attack of `family`) with the spec's tables where it has them, else the spec's own tables."""
    if names is None:
        chosen = dict(spec.attacks)
    else:
        names = attacks_for(family) if names == ["all"] else names
        chosen = {name: spec.attacks.get(name, {}) for name in names}
    for name in chosen:
        if name not in ATTACKS:
            raise PatcherError(f"unknown attack {name!r}: use all or one of {', '.join(attacks_for(family))}")
        if family not in ATTACKS[name].families:
            raise PatcherError(
                f"the {name} attack does not run on a {family} model: its attacks are "
                f"{', '.join(attacks_for(family)) or 'none registered'}"
            )
    return chosen


def run_attacks(inputs: AttackInputs, tables: dict[str, dict]) -> dict[str, dict]:
    """Each attack's row: its figures, its budget, the gate's verdict and its time."""
    rows = {}
    for name, table in tables.items():
        attack = ATTACKS[name]
        budget = attack.configure(table)
        start = time.perf_counter()
        row = attack.run(inputs, budget)
        limit = attack.limit(table, inputs.spec)
        value = row[attack.gated]
        failures = [f"{attack.gated} {value:.3f} > {limit}"] if value > limit else []
        rows[name] = {
            **row,
            "description": attack.description,
            "budget": dataclasses.asdict(budget),
            "gated": attack.gated,
            attack.gate_key: limit,
            "seconds": round(time.perf_counter() - start, 3),
            "failures": failures,
            "passed": not failures,
        }
    return rows


def run_spec_attacks(inputs: AttackInputs, timings: dict[str, float]) -> dict[str, dict] | None:
    """The rows of the attacks `inputs.spec` names (None when it names none), each attack's
    seconds added to `timings`."""
    if not inputs.spec.attacks:
        return None
    rows = run_attacks(inputs, inputs.spec.attacks)
    timings.update({f"attack {name}": row["seconds"] for name, row in rows.items()})
    return rows


# Importing every module of this package registers its attacks: a new attack is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
