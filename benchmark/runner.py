"""``deqbench evaluate``: run the leaderboard protocol of a run config into the results database.

Protocol per (model, defense) -- the paper's Sec. 4, judged on the reported forward: the
attacks of the :mod:`benchmark.suite` registry the config names (``clean`` always; ``pgd``,
``grid``, ``top_settings``, ``autoattack``, ``adaptive``, ``checks``, ``transfer``: one module
each, in plan order). The runner holds no per-attack code: it plans units from
:func:`benchmark.suite.list_attacks`, asks each attack whether it is ``planned`` and
``applicable`` for an entry, calls its ``run(ctx)`` and commits the records. The reported
robust accuracy "ALL" is the per-example worst case over everything run (:func:`summarize`,
from each attack's ``summary``).

Work is cut into units (model, defense, attack, shard of ``shard_size`` examples), each committed
atomically; a killed run restarted with the same command skips finished units. Under
``torchrun`` rank r takes shards r, r + W, ...; each rank writes ``results.rank<r>.sqlite`` and
rank 0 merges them into ``results.sqlite``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

import model_zoo
from attacks.evaluation import derive_seed
from benchmark.data import load_dataset, subset
from benchmark.provenance import provenance
from benchmark.results_db import ResultsDB, merge
from benchmark.run_config import RunConfig, defense_text
from benchmark.suite import UnitContext, get_attack, list_attacks
# names other modules and tests import from here (they live with their attacks now)
from benchmark.suite._common import parse_setting as _parse_setting  # noqa: F401
from benchmark.suite._common import state_deviation  # noqa: F401
from benchmark.suite._common import strongest_setting as _strongest_setting  # noqa: F401
from benchmark.suite.checks import CHECKS_NOT_ATTACKS, flags_from_records  # noqa: F401
from benchmark.suite.transfer import transfer_sources as _transfer_sources  # noqa: F401
from model_zoo.forward import EarlyState, EntropyReduction, make_defense

__all__ = ["evaluate", "summarize", "db_path", "defense_key", "flags_from_records",
           "state_deviation"]


def defense_key(spec) -> str:
    return defense_text(spec)


def db_path(cfg: RunConfig, rank: int = 0, world: int = 1):
    return cfg.run_dir / ("results.sqlite" if world == 1 else f"results.rank{rank}.sqlite")


def _shards(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _resolve_defense(db: ResultsDB, cfg: RunConfig, model, spec, mkey: str, progress: bool):
    """The forward of ``spec``; ``early:select`` runs the paper's selection on the validation
    split once and stores the choice in the database (a resumed run reuses it)."""
    defense = make_defense(spec)
    inner = defense.inner if isinstance(defense, EntropyReduction) else defense
    if isinstance(inner, EarlyState) and inner.index == "select":
        key = f"early_select/{mkey}"
        got = db.get_meta(key)
        if got is None:
            from attacks.pgd import select_early_state
            val = load_dataset(cfg.data["dataset"], "val", root=cfg.data.get("root"))
            val = subset(val, min(cfg.data["val_n"], len(val)), seed=cfg.data["val_seed"])
            pgd = cfg.attacks.get("pgd", {})
            chosen = select_early_state(model, val.images.to(cfg.device), val.labels.to(cfg.device),
                                        cfg.eps, pgd.get("alpha", cfg.eps / 4),
                                        pgd.get("steps", 10), batch_size=cfg.batch_size,
                                        seed=cfg.seed)
            got = {"index": chosen.index, "selection": chosen.selection}
            db.set_meta(key, got)
        inner.resolve(got["index"], got["selection"])
    if isinstance(defense, EntropyReduction):
        # Purify within the run's eps with steps eps/4 unless the spec sets them (the
        # constructor's defaults are the reference's CIFAR-10 8/255 and 2/255).
        given = spec if isinstance(spec, dict) else {}
        if "eps" not in given:
            defense.eps = cfg.eps
        if "beta" not in given:
            defense.beta = cfg.eps / 4
    return defense


def _unit_context(db, cfg, model, defense, mkey, dkey, attack, x, y, idx, progress,
                  resolve=None, cache=None) -> UnitContext:
    """The :class:`UnitContext` of one unit: its seed (from the run seed, model, defense,
    attack and first example, so that a unit's result does not depend on the plan) and the
    evaluated state's name."""
    state = None
    if getattr(model, "is_deq", False):
        inner = defense.inner if isinstance(defense, EntropyReduction) else defense
        state = "final" if not isinstance(inner, EarlyState) else f"z[{inner.index}]"
    return UnitContext(db=db, cfg=cfg, model=model, defense=defense, mkey=mkey, dkey=dkey,
                       attack=attack, opts=cfg.attacks.get(attack, {}), x=x, y=y, idx=idx,
                       state=state, seed=derive_seed(cfg.seed, mkey, dkey, attack, idx[0]),
                       progress=progress, resolve=resolve,
                       cache=cache if cache is not None else {})


def evaluate(cfg: RunConfig, progress: bool = True, rank: Optional[int] = None,
             world: Optional[int] = None, stop_after_units: Optional[int] = None,
             only: Optional[set] = None, workers=1) -> dict:
    """Run (or continue) the protocol of ``cfg``; returns ``{'db': path, 'units_run': k,
    'summary': DataFrame}``. ``stop_after_units`` (tests) returns after that many new units.
    ``only``: run just these attacks of the config (clean always runs): ``deqbench sweep`` is
    ``{'grid'}``, ``deqbench transfer`` is ``{'grid', 'transfer'}`` (the sources' strongest
    grid settings are needed first); the same database serves a later full ``evaluate``.
    ``workers``: local worker processes that run the units in parallel, each with
    ``threads_per_worker`` threads (:func:`resolve_workers`; ``'auto'`` = 2 single-thread
    processes on a CPU with >= 2 cores). Every unit's result depends only on its own seed, so
    the records are those of a serial run (up to the float effects of a thread count)."""
    if only is not None:
        missing = set(only) - set(cfg.attacks)
        if missing:
            raise ValueError(f"the run config has no attacks.{sorted(missing)[0]} section")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    dist = world > 1 and torch.distributed.is_available() and "MASTER_ADDR" in os.environ
    if world > 1 and str(cfg.device) in ("cuda", "cuda:0") and "LOCAL_RANK" in os.environ \
            and torch.cuda.device_count() > 1:
        # torchrun: one GPU per local rank (as `deqbench train` does), not every rank on cuda:0
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    if dist and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = db_path(cfg, rank, world)
    merged_path = cfg.run_dir / "results.sqlite"
    if world > 1 and merged_path.is_file():
        # Rank 0 merges into results.sqlite, skipping the units it already holds: it must not
        # hold results of another configuration (checked on every rank, before any barrier).
        with ResultsDB(merged_path) as merged_db:
            old = merged_db.get_meta("config_hash")
        if old is not None and old != cfg.hash():
            raise ValueError(f"{merged_path} holds results of a different configuration (hash "
                             f"{old} vs {cfg.hash()}); give the run a new name or delete "
                             f"{cfg.run_dir}")
    db = ResultsDB(path)
    archive = None
    if cfg.archive:
        from benchmark.archive import Archive
        if world > 1:
            db.close()
            raise ValueError("archive: runs of one process group only (world size 1); run the "
                             "ranks without an archive, or one rank with --workers")
        archive = Archive(cfg.archive, cfg)
        try:
            # a fresh database (lost runs/, a new clone) takes the archived run's metadata
            # and computed state (e.g. the early state chosen on validation data)
            archive.restore_state(db, archive.check())
        except BaseException:
            db.close()
            raise
    old = db.get_meta("config_hash")
    if old is not None and old != cfg.hash():
        before = db.get_meta("weights") or {}
        changed = [k for k, v in cfg.weights().items() if k in before and before[k] != v]
        db.close()
        why = (f"the weights of {', '.join(changed)} changed since it ran (re-trained or "
               "re-published)" if changed else "a different configuration")
        raise ValueError(f"{path} holds results of {why} (hash {old} vs {cfg.hash()}); give "
                         f"the run a new name or delete {cfg.run_dir}")
    if old is None:
        db.set_meta("config", cfg.to_dict())
        db.set_meta("config_hash", cfg.hash())
        db.set_meta("weights", cfg.weights())
        db.set_meta("config_source", cfg.source)
        db.set_meta("seed", cfg.seed)
        db.set_meta("provenance", provenance(cfg.device))
        db.set_meta("start_time", time.time())
    db.set_meta(f"last_invocation/{rank}", provenance(cfg.device))
    ds, first_n = _test_subset(cfg)
    db.set_meta("dataset", {"name": ds.info.name, "split": "test", "n": len(ds),
                            "seed": cfg.data["seed"], "first_n": first_n,
                            "indices": [int(i) for i in ds.indices]})
    shards = [s for j, s in enumerate(_shards(len(ds), cfg.shard_size)) if j % world == rank]
    done = db.done_units()
    plan = []
    # in the registry's order: an attack that reads another's records (top_settings and
    # transfer read the grid's) is planned after it
    for attack in list_attacks():
        spec = get_attack(attack)
        if not spec.always and (attack not in cfg.attacks
                                or (only is not None and attack not in only)):
            continue
        opts = cfg.attacks.get(attack, {})
        for m in cfg.models:
            for dspec in m.defenses:
                if not spec.planned(cfg, m, dspec, opts):
                    continue
                for lo, hi in shards:
                    plan.append((m, dspec, attack, lo, hi))
    if cfg.unit_order == "shard":
        plan = shard_major(plan)
    if archive is not None:
        imported, exported = archive.sync(db)
        done = db.done_units()
        archive.write_meta(db, {**provenance(cfg.device), "imported_units": imported,
                                "exported_units": exported, "done_before": len(done)})
        archive.maybe_commit(f"results: {cfg.name}: {len(done & _uids(plan))}/{len(plan)} "
                             "units (start)", force=True)
    todo = [p for p in plan if _uid(p) not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"evaluate {cfg.name}")
    n_workers, threads = resolve_workers(workers, cfg, world)
    db.set_meta(f"last_invocation/{rank}/workers", {"workers": n_workers,
                                                     "threads_per_worker": threads})
    plan_ids = _uids(plan)
    archived = {"n": len(done & plan_ids)}

    def unit_done(reader, uid):
        # archive each finished unit at once (and any state it computed, into run.json);
        # commit the archive at most every every_s seconds
        if archive is None:
            return
        archive.export_unit(reader, uid)
        archive.write_meta(reader)
        archived["n"] += 1
        archive.maybe_commit(f"results: {cfg.name}: {archived['n']}/{len(plan)} units")

    try:
        if n_workers > 1 and len(todo) > 1 and stop_after_units is None:
            db.close()
            reader = ResultsDB(path) if archive is not None else None
            try:
                _run_parallel(cfg, path, todo, n_workers, threads, rank, bar,
                              on_done=lambda p: unit_done(reader, _uid(p)))
            finally:
                if reader is not None:
                    reader.close()
            db = ResultsDB(path)
            ran = len(todo)
        else:
            resolve = _resolver(db, cfg, {}, {}, progress)
            caches = {}
            ran = 0
            for p in todo:
                m, dspec, attack, lo, hi = p
                _run_unit(db, cfg, ds, resolve, caches, m, dspec, attack, lo, hi, progress, rank)
                unit_done(db, _uid(p))
                ran += 1
                if bar is not None:
                    bar.update(1)
                if stop_after_units is not None and ran >= stop_after_units:
                    break
        if bar is not None:
            bar.close()
        complete = plan_ids <= db.done_units()
        if complete and db.get_meta("end_time") is None:
            db.set_meta("end_time", time.time())
    except BaseException:
        if archive is not None:
            try:
                _archive_finish(archive, path, cfg, plan_ids, only)
            except Exception as e:  # never mask the error that stopped the run
                print(f"deqbench: archive: could not archive/commit at the stop ({e}); the next "
                      "run archives what the database holds", file=sys.stderr)
        raise
    if archive is not None:
        _archive_finish(archive, path, cfg, plan_ids, only)
    db.close()
    out_path = path
    if world > 1:
        if dist:
            torch.distributed.barrier()
        if rank == 0:
            out_path = cfg.run_dir / "results.sqlite"
            parts = [db_path(cfg, r, world) for r in range(world)]
            merge(out_path, parts)
            # complete only if every rank finished its shards (each sets end_time when done)
            ends = []
            for p in parts:
                with ResultsDB(p) as d:
                    ends.append(d.get_meta("end_time"))
            complete = all(e is not None for e in ends)
            if complete:
                with ResultsDB(out_path) as d:
                    d.set_meta("end_time", max(ends))
    result = {"db": out_path, "units_run": ran, "complete": complete}
    if rank == 0 and (world == 1 or dist):
        with ResultsDB(out_path) as d:
            result["summary"] = summarize(d)
    return result



def _archive_finish(archive, path, cfg, plan_ids, only) -> None:
    """At the end of an invocation (also when stopped by an error or Ctrl-C): archive whatever
    finished, record the invocation, mark the archive complete only when every unit of the
    FULL plan is in it (not a ``sweep``'s subset), commit."""
    with ResultsDB(path) as adb:
        archive.sync(adb)
        done = adb.done_units()
        n_done = len(done & plan_ids)
        full = only is None and plan_ids <= done
        archive.write_meta(adb, {"finished": time.time(), "done": n_done,
                                 "only": sorted(only) if only is not None else None},
                           complete=full)
    archive.maybe_commit(f"results: {cfg.name}: {n_done}/{len(plan_ids)} units"
                         + (" (complete)" if full else ""), force=True)


def shard_major(plan) -> list:
    """``plan`` (in the registry's attack order) reordered shard by shard, so a run stopped at
    any point holds whole shards (every attack of every entry on the same examples). An
    attack with ``reads_all_shards`` (top_settings: the run's k strongest grid settings) is a
    barrier: it and every later attack run shard by shard only after every shard of the
    attacks before it. Stable within a shard (the registry's order)."""
    phase, k = {}, 0
    for key in list_attacks():
        if getattr(get_attack(key), "reads_all_shards", False):
            k += 1
        phase[key] = k
    return sorted(plan, key=lambda p: (phase[p[2]], p[3]))


def _uid(p) -> str:
    """The unit id of a plan item (model spec, defense spec, attack, lo, hi)."""
    return f"{p[0].key}|{defense_key(p[1])}|{p[2]}|{p[3]}-{p[4]}"


def _uids(plan) -> set:
    return {_uid(p) for p in plan}


def _test_subset(cfg: RunConfig):
    """The run's test examples (the first n, or a seeded subset) and whether they are the first n."""
    ds = load_dataset(cfg.data["dataset"], "test", root=cfg.data.get("root"))
    first_n = bool(cfg.data.get("first_n", False))  # the first n test images, else seeded
    return subset(ds, min(cfg.data["n"], len(ds)), seed=cfg.data["seed"], first_n=first_n), first_n


def _resolver(db, cfg, models: dict, defenses: dict, progress: bool):
    """``resolve(model_spec, defense_spec) -> (model, defense)``, loading each once."""
    def resolve(m, dspec):
        dkey = defense_key(dspec)
        if m.key not in models:
            models[m.key] = model_zoo.load(m.name, checkpoint=m.checkpoint, device=cfg.device)
        model = models[m.key]
        if (m.key, dkey) not in defenses:
            defenses[(m.key, dkey)] = (_resolve_defense(db, cfg, model, dspec, m.key, progress)
                                       if getattr(model, "is_deq", False) else None)
        return model, defenses[(m.key, dkey)]
    return resolve


def _run_unit(db, cfg, ds, resolve, caches, m, dspec, attack, lo, hi, progress, rank):
    """Run one unit (model, defense, attack, shard lo:hi) and commit its records atomically."""
    dkey = defense_key(dspec)
    uid = f"{m.key}|{dkey}|{attack}|{lo}-{hi}"
    model, defense = resolve(m, dspec)
    spec = get_attack(attack)
    if not spec.applicable(model, defense, cfg.attacks.get(attack, {})):
        db.commit_unit(uid, m.key, dkey, attack, f"{lo}-{hi}", [], 0.0, {"skipped": True}, rank)
        return
    torch.manual_seed(derive_seed(cfg.seed, uid))
    x = ds.images[lo:hi].to(cfg.device)
    y = ds.labels[lo:hi].to(cfg.device)
    idx = [int(i) for i in ds.indices[lo:hi]]
    t0 = time.perf_counter()
    ctx = _unit_context(db, cfg, model, defense, m.key, dkey, attack, x, y, idx, progress,
                        resolve=resolve, cache=caches.setdefault(attack, {}))
    recs, conf = spec.run(ctx)
    wall = time.perf_counter() - t0
    for r in recs:
        r["wall_s"] = wall / max(len(idx), 1)
    db.commit_unit(uid, m.key, dkey, attack, f"{lo}-{hi}", recs, wall,
                   {"attack": conf, "defense": None if defense is None else defense.config()},
                   rank, adversarial=ctx.kept)


def resolve_workers(workers, cfg: RunConfig, world: int = 1):
    """(worker processes, threads per worker) for ``workers`` = an int >= 1 or ``'auto'``.

    'auto': on a CPU run with >= 2 cores and no torchrun, 2 processes with half the cores
    each, else 1 (a GPU run keeps one process per device). Why two processes: on the 2-core
    CPU, two single-thread processes measured 1.42-1.48x the throughput of one two-thread
    process on a grid step (issue 16): the tiny DEQ's convolutions do not keep two threads
    busy, and units are independent. The environment variable DEQBENCH_WORKERS (an integer)
    replaces 'auto'."""
    cores = os.cpu_count() or 1
    if workers == "auto" and os.environ.get("DEQBENCH_WORKERS", "auto") != "auto":
        text = os.environ["DEQBENCH_WORKERS"]   # e.g. the test suite pins 1
        workers = int(text) if text.isdigit() else text
    if workers == "auto":
        dev = str(cfg.device)
        n = 2 if (world == 1 and dev.startswith("cpu") and cores >= 2) else 1
    else:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1 or 'auto', got {workers!r}")
        n = workers
    if n == 1:
        return 1, torch.get_num_threads()
    return n, max(1, cores // n)


def _unit_deps(todo, cfg=None):
    """For each unit of ``todo`` (plan order), the indices of the units it waits for: the units
    of the same shard and model with a lower attack ``order`` (an attack may read the records
    of an earlier attack of its model: top_settings and adaptive read the grid's), of every
    shard for an attack with ``reads_all_shards`` (top_settings); an attack
    with ``reads_all_models`` (transfer: the sources' strongest grid settings) waits for every
    lower-order unit of its shard; one whose ``first_shard_first`` (the pruned grid) waits
    for its entry's unit on the first shard of the plan. An attack that declares ``reads``
    waits only for the units of those attacks and of ``clean`` (which resolves the entry's
    defense first): the others may run beside it, so e.g. transfer no longer waits for every
    entry's AutoAttack and checks. Which units run when never changes a record (each unit is
    seeded by its own id and reads only what it declares)."""
    deps = []
    first = min((t[3] for t in todo), default=0)
    for j, (m, d, attack, lo, hi) in enumerate(todo):
        spec = get_attack(attack)
        wide = getattr(spec, "reads_all_models", False)
        every_shard = getattr(spec, "reads_all_shards", False)
        reads = getattr(spec, "reads", None)
        dep = {k for k, (m2, _d2, a2, lo2, _h2) in enumerate(todo[:j])
               if (lo2 == lo or every_shard) and get_attack(a2).order < spec.order
               and (wide or m2.key == m.key)
               and (reads is None or a2 == "clean" or a2 in reads)}
        opts = cfg.attacks.get(attack, {}) if cfg is not None else {}
        if lo != first and spec.first_shard_first(opts):
            dep |= {k for k, (m2, d2, a2, lo2, _h2) in enumerate(todo[:j])
                    if lo2 == first and a2 == attack and m2.key == m.key
                    and defense_key(d2) == defense_key(d)}
        deps.append(dep)
    return deps


def _worker_main(cfg, path, threads, rank, tasks, results):
    """A worker process of :func:`_run_parallel`: runs the units it is sent into the shared
    database (SQLite in WAL mode, one writer at a time, each unit one transaction)."""
    from model_zoo.runtime import tune_allocator
    tune_allocator()  # a spawned process: the parent's malloc settings do not carry over
    torch.set_num_threads(threads)
    db = ResultsDB(path)
    ds, _ = _test_subset(cfg)
    resolve = _resolver(db, cfg, {}, {}, False)
    caches = {}
    while True:
        task = tasks.get()
        if task is None:
            break
        j, (m, dspec, attack, lo, hi) = task
        try:
            _run_unit(db, cfg, ds, resolve, caches, m, dspec, attack, lo, hi, False, rank)
            results.put((j, None))
        except BaseException as e:  # sent to the parent, which stops the run and raises it
            import traceback
            results.put((j, (e.__class__.__name__, str(e), traceback.format_exc())))
            break
    db.close()


def _pick(w: int, pending: list, deps: list, done: set, pinned: list):
    """The unit (index) idle worker ``w`` runs next, None if none is ready: the ready unit
    earliest in plan order. Worker 0 alone may run pinned units, and it takes a ready one
    first, so they do not pile up at the end of the run while the other workers idle."""
    if w == 0:
        pick = next((j for j in pending if pinned[j] and deps[j] <= done), None)
        if pick is not None:
            return pick
    return next((j for j in pending if deps[j] <= done and (not pinned[j] or w == 0)), None)


def _run_parallel(cfg, path, todo, n_workers, threads, rank, bar, on_done=None):
    """Run ``todo`` on ``n_workers`` local processes, each unit once its dependencies
    (:func:`_unit_deps`) are committed; the ready unit earliest in plan order goes to the next
    idle worker. Units of an attack with ``pinned = True`` (transfer: its cache of crafted
    examples is shared by every target) all go to worker 0, which takes them before any other
    ready unit. A unit that fails stops the run:
    finished units stay committed, the error is raised here."""
    import multiprocessing as mp
    import queue as _queue
    ctx = mp.get_context("spawn")  # fork after torch's thread pools were created is unsafe
    deps = _unit_deps(todo, cfg)
    pinned = [bool(getattr(get_attack(t[2]), "pinned", False)) for t in todo]
    results = ctx.Queue()
    task_qs = [ctx.Queue() for _ in range(n_workers)]
    procs = [ctx.Process(target=_worker_main, args=(cfg, path, threads, rank, task_qs[w], results),
                         daemon=True) for w in range(n_workers)]
    for p in procs:
        p.start()
    done, running = set(), {}          # running: unit index -> worker
    idle = list(range(n_workers))
    pending = list(range(len(todo)))
    try:
        while len(done) < len(todo):
            for w in list(idle):
                pick = _pick(w, pending, deps, done, pinned)
                if pick is None:
                    continue
                pending.remove(pick)
                idle.remove(w)
                running[pick] = w
                task_qs[w].put((pick, todo[pick]))
            if not running:
                raise RuntimeError("no unit can run: a dependency cycle in the plan")
            try:
                j, err = results.get(timeout=2.0)
            except _queue.Empty:
                dead = [w for w, p in enumerate(procs) if not p.is_alive()
                        and w in running.values()]
                if dead:
                    raise RuntimeError(f"worker process {dead[0]} died (exit code "
                                       f"{procs[dead[0]].exitcode}); finished units are "
                                       "committed, run the same command again") from None
                continue
            w = running.pop(j)
            if err is not None:
                name, msg, tb = err
                raise RuntimeError(f"unit {todo[j][0].key}|{defense_key(todo[j][1])}|"
                                   f"{todo[j][2]}|{todo[j][3]}-{todo[j][4]} failed in a worker: "
                                   f"{name}: {msg}\n{tb}")
            done.add(j)
            idle.append(w)
            if on_done is not None:
                on_done(todo[j])
            if bar is not None:
                bar.update(1)
    finally:
        for q in task_qs:
            try:
                q.put(None)
            except Exception:
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def summarize(db: ResultsDB):
    """Per (model, defense): accuracies derived from the per-example records.

    clean; n; the evaluated state; f-evals per clean forward; then each protocol attack's
    fields (its ``summary``: pgd; grid = per-example worst case over the grid settings run, and
    min_over_means / strongest_setting when every setting covered every example; top_settings;
    autoattack; adaptive; checks' flags; transfer); ALL = per-example worst case over every
    record that counts as an attack (a point counts as robust only if it is correct clean and
    under every attack)."""
    import pandas as pd
    df = db.records_frame()
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    from benchmark.reliability import reliability_rows, thresholds
    rel = reliability_rows(df, thresholds(db.get_meta("config"))[0])
    for (mk, dk), g in df.groupby(["model", "defense"], sort=False):
        clean_recs = g[g.attack == "clean"]
        n = clean_recs.example.nunique()
        row = {"model": mk, "defense": dk, "n": n,
               "clean": clean_recs.correct.mean() if n else float("nan"),
               "state": clean_recs.state.iloc[0] if n else None,
               "f_evals_per_forward": (clean_recs.nfev_nograd + clean_recs.nfev_grad).mean()
               if n else None}
        clean = clean_recs.set_index("example").correct
        final = {}
        for key in list_attacks():
            per_example, fields = get_attack(key).summary(g, clean)
            if per_example is not None:
                final[key] = per_example
            row.update(fields)
        allc = pd.concat(final, axis=1).reindex(clean.index).fillna(0).min(axis=1)
        row["ALL"] = allc.mean()
        # examples with non-finite outputs (counted wrong) / share with unconverged solves
        row["nonfinite"] = rel[(mk, dk)]["nonfinite"]
        row["unconverged"] = rel[(mk, dk)]["unconverged_share"]
        rows.append(row)
    return pd.DataFrame(rows)
