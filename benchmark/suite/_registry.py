"""The registry of protocol attacks (timm-style: ``@register_attack(key)``, ``get_attack``,
``list_attacks``), the base class every attack derives from, and the per-unit context."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from model_zoo.train_config import ConfigError

__all__ = ["ProtocolAttack", "UnitContext", "register_attack", "get_attack", "list_attacks",
           "config_attacks", "attack_options", "config_error", "check_int"]

_REGISTRY: dict = {}   # key -> ProtocolAttack instance (the only global state)


def register_attack(key: str):
    """Class decorator: register ``cls()`` under ``key`` (sets ``cls.key``). A second attack
    with the same key is an error (two files claiming one config section)."""
    def deco(cls):
        if key in _REGISTRY and type(_REGISTRY[key]) is not cls:
            raise ValueError(f"protocol attack {key!r} is registered twice "
                             f"({type(_REGISTRY[key]).__module__} and {cls.__module__})")
        cls.key = key
        _REGISTRY[key] = cls()
        return cls
    return deco


def get_attack(key: str) -> "ProtocolAttack":
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"unknown protocol attack {key!r} (known: {list_attacks()})") from None


def list_attacks() -> list:
    """All keys in plan order (``order``, then key): the order the runner plans units in."""
    return [k for k, _ in sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0]))]


def config_attacks() -> list:
    """The keys a run config may name under ``attacks:`` (every attack but the ones that
    always run, i.e. ``clean``), sorted."""
    return sorted(k for k, a in _REGISTRY.items() if not a.always)


def attack_options(key: str) -> set:
    """The option names ``attacks.<key>`` accepts."""
    return set(get_attack(key).options)


def config_error(key: str, msg: str):
    """Raise the run config's one-line error (``run config: KEY: MSG``)."""
    raise ConfigError(f"run config: {key}: {msg}")


def check_int(opts: dict, key: str, lo=None, path: str = ""):
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        config_error(f"{path}{key}", f"must be an integer{'' if lo is None else f' >= {lo}'}, "
                                     f"got {v!r}")
    return v


@dataclass
class UnitContext:
    """Everything one work unit (model, defense, attack, shard) may use.

    ``x`` (B, C, H, W) in [0, 1] and ``y`` (B,) on ``cfg.device``; ``idx`` the B dataset
    indices (record keys); ``state`` the evaluated state's name ('final', 'z[i]', None for
    non-DEQs); ``seed`` derived from (run seed, model, defense, attack, first index), so a
    unit's result does not depend on which units ran before it; ``resolve(model_spec,
    defense_spec) -> (model, defense)`` loads another entry of the run (transfer sources);
    ``cache`` a dict private to this attack key that lives for the whole invocation (e.g.
    adversarial examples crafted once per source and reused by every target); ``kept``
    {name: (examples, x_adv)}: adversarial examples this unit keeps for later units, written
    with its records (:meth:`keep`; ``ResultsDB.adversarial`` reads them)."""
    db: Any
    cfg: Any
    model: Any
    defense: Any
    mkey: str
    dkey: str
    attack: str
    opts: dict
    x: Any
    y: Any
    idx: list
    state: Optional[str]
    seed: int
    progress: bool = False
    resolve: Optional[Callable] = None
    cache: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)

    def keep(self, name: str, x_adv, examples=None) -> None:
        """Keep ``x_adv`` (rows = ``examples``, default this unit's ``idx``) in the database
        with this unit's records, for a later unit of the run to reuse."""
        self.kept[name] = (list(self.idx if examples is None else examples), x_adv)

    @property
    def eps(self) -> float:
        return self.cfg.eps

    @property
    def is_deq(self) -> bool:
        return bool(getattr(self.model, "is_deq", False))

    def opt(self, name: str):
        """Option ``name`` of this attack: the config's value, else the attack's default (a
        callable default is evaluated on the context, e.g. ``alpha = eps / 4``)."""
        if name in self.opts:
            return self.opts[name]
        default = get_attack(self.attack).options[name]
        return default(self) if callable(default) else default


class ProtocolAttack:
    """One protocol attack of ``deqbench evaluate``; subclass, decorate with
    ``@register_attack("key")``.

    Class attributes: ``options`` {name: default} (the config's allowed keys; a callable
    default gets the :class:`UnitContext`; ``None`` = computed or unset), ``order`` (plan
    position: units of lower order run first, so an attack that reads another's records --
    top_settings reads grid -- must come later), ``always`` (runs without a config section:
    clean), ``reads_all_models`` (its units read other models' records of the same shard, so a
    parallel run waits for every earlier unit of the shard, not only its model's),
    ``reads_all_shards`` (its units read its entry's lower-order records of EVERY shard --
    top_settings: the k settings that broke the most examples of the run -- so each waits for
    them, and ``unit_order: shard`` runs it only after every shard's lower-order units),
    ``pinned`` (a parallel run sends all its units to one worker, which keeps its ``cache``),
    ``reads`` (the keys of the lower-order attacks whose records or stored state its units
    read -- transfer reads only the sources' grids -- so a parallel run waits only for those
    units and the entry's clean unit; ``None``, the default, waits for every lower-order unit:
    an attack that does not declare what it reads is never started too early)."""
    key: ClassVar[str] = ""
    options: ClassVar[dict] = {}
    order: ClassVar[float] = 100.0
    always: ClassVar[bool] = False
    reads_all_models: ClassVar[bool] = False
    reads_all_shards: ClassVar[bool] = False
    pinned: ClassVar[bool] = False
    reads: ClassVar[Optional[tuple]] = None

    def check(self, opts: dict, cfg, attacks: dict) -> None:
        """Validate this attack's options beyond the generic ones the run config checks (known
        names, ``steps``, ``alpha``, surrogates, flags, ranges); raise with :func:`config_error`.
        ``cfg`` is the partly built RunConfig (models known), ``attacks`` the raw section."""

    def first_shard_first(self, opts: dict) -> bool:
        """True: a parallel run starts this attack's later shards of an entry only after its
        first shard (which stores something the others reuse: the pruned grid's calibration)."""
        return False

    def applicable(self, model, defense, opts: dict) -> bool:
        """False: the unit is committed as skipped (no records)."""
        return True

    def planned(self, cfg, model_spec, defense_spec, opts: dict) -> bool:
        """False: no unit is planned for this (model, defense) at all (e.g. transfer targets)."""
        return True

    def run(self, ctx: UnitContext):
        """Attack ``ctx.x``; returns ``(records, config)``: one dict per (setting, example)
        with at least setting, example, label, correct (see benchmark.results_db.RECORD_FIELDS),
        and the JSON-able configuration stored with the unit."""
        raise NotImplementedError

    def summary(self, g, clean):
        """From the records ``g`` of one (model, defense) (all attacks; ``clean`` the clean
        correctness indexed by example): ``(per_example, fields)``: the per-example
        correctness that counts in ALL (a Series indexed by example, or None: these records
        are not eps-attacks or none exist) and the summary row's fields. Default: every record
        of this key, per-example worst case over settings, field ``{key: accuracy}``."""
        a = g[g.attack == self.key]
        if not len(a):
            return None, {}
        s = a.groupby("example").correct.min()
        return s, {self.key: s.reindex(clean.index).fillna(0).mean()}
