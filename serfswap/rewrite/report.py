"""The plan of a conversion, and the report a converted model carries: one table of sites."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Site:
    """One place an activation sits in a model.

    ``kind`` is where it sits: ``module`` (a child module), ``norm-act`` (the activation of a
    fused norm+act layer such as timm's ``BatchNormAct2d``), ``attribute`` (a function stored as
    a module attribute), ``functional`` (a call in a module's code, ``where`` says which),
    ``string`` (an activation chosen by name, ``activation=self.activation``) or ``run-time``
    (a call no static reading found, that the run-time audit saw run inside the module ``name``:
    a helper function, a module built during the forward).
    ``left`` marks an activation that was to be converted and still runs (seen by the audit).
    ``role`` is ``positivity`` for an activation whose output the model needs non-negative
    (a linear-attention feature map, ``relu(x) + eps`` before a division); ``rule`` says which
    rule of :mod:`serfswap.positivity` recognised it, and ``reason`` what it saw, and where.
    """

    name: str
    kind: str
    source: str
    family: str
    convert: bool
    reason: str = ""
    gated: bool = False
    aliases: tuple[str, ...] = ()
    where: str = ""
    role: str = ""  # "positivity": the output must stay non-negative (serfswap.positivity)
    rule: str = ""  # the rule that recognised the role: "known", "query-key", "denominator"
    left: bool = False  # to be converted, yet it still runs: the run-time audit saw it


@dataclass
class Plan:
    """What :func:`serfswap.convert` would change (``applied=False``) or changed (``True``).

    ``audited``: one forward on example inputs checked which activations still run (see
    :mod:`serfswap.audit`); ``audit_error`` says why that forward failed, when it did.
    """

    model: str
    sites: list[Site]
    applied: bool = False
    config_updates: dict[str, tuple[str, str]] = field(default_factory=dict)  # field: (old, new)
    notes: list[str] = field(default_factory=list)
    audited: bool = False
    audit_error: str = ""

    @property
    def converted(self) -> list[Site]:
        return [s for s in self.sites if s.convert]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if not s.convert]

    @property
    def left(self) -> list[Site]:
        """Activations that were to be converted and still run: a partial conversion."""
        return [s for s in self.sites if s.left]

    def counts(self) -> Counter[str]:
        """Converted sites per original class or function."""
        return Counter(s.source for s in self.converted)

    def summary(self) -> str:
        """One line: how many sites were (or would be) converted, of what, and how many left."""
        verb = "converted" if self.applied else "to convert"
        counts = ", ".join(f"{src} x{n}" for src, n in self.counts().most_common())
        return (
            f"serfswap {'report' if self.applied else 'plan'} for {self.model}: "
            f"{len(self.converted)} {verb}"
            + (f" ({counts})" if counts else "")
            + f", {len(self.skipped)} left as they are"
            + (
                f"; PARTIAL: {len(self.left)} that were to be converted still run"
                if self.left
                else ""
            )
            + ("" if self.audited else " (not audited at run time)")
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        rows = [("name", "kind", "original", "action")]
        for s in self.sites:
            name = s.name or "(root)"
            if s.aliases:
                name += f" (shared with {', '.join(s.aliases)})"
            if s.where:
                name += f" [{s.where}]"
            if s.convert:
                action = "serf" + (", gated MLP" if s.gated else "")
                action += (
                    f" (positivity constraint, rule {s.rule}: converted as asked)" if s.role else ""
                )
            else:
                action = f"skip: {s.reason}"
            rows.append((name, s.kind, s.source, action))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            lines.append(
                "  "
                + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
                + "  "
                + row[3]
            )
        for key, (old, new) in self.config_updates.items():
            lines.append(f"  config.{key}: {old!r} -> {new!r}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)
