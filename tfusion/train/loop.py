"""The training loop: set-up, resume, steps, logging, evaluation, checkpoints, preemption.

The Trainer is handed its inputs; it never builds them (and never imports
data_pipelines). launch/train_setup.py is where a run is put together, as big_vision's
train.py builds its input pipeline and evaluators: it validates the data config,
then passes the train and held-out iterator factories, the tokenizer (sample grids)
and the final evaluation (train.final_eval_suite) into the Trainer. A run restarted
with the same workdir resumes from the newest checkpoint (state, RNG and
data-iterator state together), so the resumed steps see the same batches and the
same noise as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import diffusion, flops, losses, sharding
from tfusion.config import ConfigError
from tfusion.batch import BATCH_NDIMS
from tfusion.eval.heldout import HeldoutEvaluator
from tfusion.train.step import Objective
from tfusion.train import distributed, mfu, optimizer, state as state_lib, step as step_lib
from tfusion.train.checkpoint import Checkpointer, iterator_state_for
from tfusion.train.warm_start import warm_start
from tfusion.train.feed import BatchFeed, data_counts
from tfusion.train.metrics import MetricsWriter, console_line, data_summary, write_config
from tfusion.train.params import abstract_model, stream_keys
from tfusion.train.validate import validate_config
from tfusion.train.workdir import WorkdirLock, check_resume_config

_log = logging.getLogger("tfusion.train")



class NonFiniteError(RuntimeError):
    """The run stopped after train.max_nonfinite_steps non-finite steps in a row."""


@dataclasses.dataclass
class TrainResult:
    step: int
    stopped: str  # "done" | "preempted"
    last_metrics: dict


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary.

    A boundary may never come (an input pipeline that delivers nothing, a stalled
    held-out evaluation), and a cluster's grace period after SIGTERM is short, so the
    signal also starts a deadline (train.preemption_timeout_s, 0 = none): a run still
    alive then logs what it was waiting on and exits with 143 (128 + SIGTERM). The
    loop keeps `waiting_on` current for that message.
    """

    def __init__(self, timeout_s: float, describe_checkpoints: Callable[[], str]):
        self.requested = False
        self.waiting_on = "start-up"
        self._timeout_s = timeout_s
        self._describe_checkpoints = describe_checkpoints
        self._previous = None
        self._deadline: threading.Timer | None = None

    def _handler(self, signum, frame):
        _log.warning("SIGTERM received: saving a checkpoint and stopping (waiting on %s; "
                     "deadline %s)", self.waiting_on,
                     f"{self._timeout_s:g} s" if self._timeout_s else "none")
        self.requested = True
        if self._timeout_s and self._deadline is None:
            self._deadline = threading.Timer(self._timeout_s, self._expire)
            self._deadline.daemon = True
            self._deadline.start()

    def _expire(self) -> None:
        _log.error("SIGTERM deadline (train.preemption_timeout_s=%g) passed while waiting on "
                   "%s: exiting without a new checkpoint; %s", self._timeout_s,
                   self.waiting_on, self._describe_checkpoints())
        logging.shutdown()  # flush the handlers: os._exit skips interpreter clean-up
        os._exit(128 + signal.SIGTERM)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def finished(self) -> None:
        """The run has shut down: the deadline is no longer needed."""
        if self._deadline is not None:
            self._deadline.cancel()


class IteratorFn(Protocol):
    """Makes this process's batch iterator: (config, *, process_index, process_count).

    Train: infinite, with get_state() / set_state() for checkpoints. Held-out: finite,
    called afresh for every evaluation. Either may have data_counts() and close()."""

    def __call__(self, config, *, process_index: int, process_count: int) -> Iterator[dict]:
        ...


# (step, sampling params) -> flat {name: number} metrics. Every process calls it with
# the params sharded on the training mesh; only the primary process writes files.
FinalEval = Callable[[int, Any], dict]


def _step_flops(model_cfg, local_batch, processes: int) -> float:
    """FLOPs of the global step, estimated as this process's batch times the processes
    (numpy only: it runs on the feed thread)."""
    return flops.train_step_flops(model_cfg, local_batch) * processes


def _summed_over_processes(counts: dict) -> dict:
    """Data counters of the whole run: every process reads its own shard."""
    if jax.process_count() == 1:
        return counts
    total: dict = {}
    for process_counts in distributed.allgather_json(counts):
        for key, value in process_counts.items():
            total[key] = total.get(key, 0) + int(value)
    return total


class Trainer:
    """One training run in `workdir`, fed by what the caller built.

    train_iterator_fn: this process's training batches (needed by run()).
    eval_iterator_fn: held-out batches for train.eval_every.
    tokenizer: encodes train.sample_prompts for train.sample_every grids.
    final_eval: train.final_eval_suite at the end of the run, (step, params) -> metrics.
    The config is validated here except for config.data, which belongs to whoever
    built the iterators (launch/train_setup.py validates it with data_pipelines).
    """

    def __init__(self, config, workdir: str, *, train_iterator_fn: IteratorFn | None = None,
                 eval_iterator_fn: IteratorFn | None = None, tokenizer=None,
                 final_eval: FinalEval | None = None, devices=None):
        validate_config(config, None if devices is None else len(devices))
        _check_inputs(config, eval_iterator_fn, tokenizer, final_eval)
        self.profile_window = profile_window(config)
        self.config, self.workdir = config, workdir
        self.primary = jax.process_index() == 0
        self.mesh = sharding.make_mesh(config.mesh, devices)
        self.table = sharding.mesh_rules(config.mesh)
        t = config.train
        self.tx = optimizer.make_optimizer(config.optimizer, tuple(t.get("freeze", ())))
        self.schedule = optimizer.learning_rate_schedule(config.optimizer, t.steps)
        self.state_sh = state_lib.train_state_shardings(config.model, self.tx, self.mesh, self.table,
                                                  ema=state_lib.uses_ema(config))
        graphdef, _ = abstract_model(config.model)
        # One noise process for the objective and the held-out diagnostics.
        process = diffusion.NoiseProcess(config.diffusion)
        # Rows are sharded over data x fsdp: each device's rows are one image group.
        self.image_groups = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.objective = Objective(graphdef, config, process, self.image_groups)
        train_step = step_lib.make_train_step(self.objective, self.tx, self.schedule,
                                              t.grad_accum_steps, self.mesh, self.table,
                                              ema_decay=float(t.get("ema_decay", 0.0)))
        self.step_fn = step_lib.jit_train_step(train_step, self.mesh, self.table,
                                               self.state_sh, BATCH_NDIMS)
        self.eval_fn = step_lib.make_eval_step(self.objective, self.mesh, self.table,
                                               self.state_sh["params"], BATCH_NDIMS)
        self.diagnostics = HeldoutEvaluator(
            graphdef, config, process=process, mesh=self.mesh, table=self.table,
            out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        self.train_iterator_fn, self.eval_iterator_fn = train_iterator_fn, eval_iterator_fn
        self.tokenizer, self.final_eval = tokenizer, final_eval
        self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                         t.keep_checkpoints)
        self.writer = None
        self.peak_flops = mfu.peak_flops_per_device(t.peak_flops_per_device)

    # --- set-up ---

    def _iterator(self, fn):
        kwargs = {}
        if self.objective.images_per_unit:  # the pipeline packs to the model's capacity
            kwargs["image_groups"] = self.image_groups
        return fn(self.config, process_index=jax.process_index(),
                  process_count=jax.process_count(), **kwargs)

    def restore_or_init(self, data_iterator):
        """The newest checkpoint's state (in this mesh's shardings) or a fresh state."""
        target = state_lib.abstract_state(self.config.model, self.tx, self.state_sh)
        restored = self.checkpointer.restore_latest(target)
        if restored is None:
            _, state = state_lib.init_state(self.config.model, self.tx, self.mesh, self.table,
                                            self.config.train.seed, self.state_sh)
            if self.config.train.get("init_from", ""):
                state = warm_start(state, self.config, self.mesh, self.table, self.workdir)
            return state
        latest, state, data = restored
        it_state = iterator_state_for(data, jax.process_index(), jax.process_count())
        if it_state is not None:
            data_iterator.set_state(it_state)
        _log.info("resumed from checkpoint step %d (%s)", latest, self.checkpointer.directory)
        return state

    # --- pieces of the loop ---

    def save(self, step: int, state: dict, iterator_state) -> None:
        """Checkpoint of `state` after `step`; `iterator_state` is this process's data
        position after the step's batch (BatchFeed.state)."""
        states = distributed.allgather_json(iterator_state)
        self.checkpointer.save(step, state, states)

    def evaluate(self, state) -> dict:
        """Held-out metrics: the training objective with the raw params (comparable to
        the train loss) and, with the params that sampling uses (the EMA where kept),
        perplexity, denoising skill by noise level and the cross-modal gaps
        (tfusion/eval/heldout.py)."""
        it = self._iterator(self.eval_iterator_fn)
        key = stream_keys(self.config.train.seed)["eval"]
        sampling_params = state.get("ema_params", state["params"])
        total = diag = None
        for i, local in enumerate(it):
            batch = distributed.global_batch(local, self.mesh, self.table)
            rng = jax.random.fold_in(key, i)
            sums = self.eval_fn(state["params"], batch, rng)
            total = sums if total is None else jax.tree.map(np.add, total, sums)
            d = self.diagnostics.batch_sums(sampling_params, batch, rng)
            diag = d if diag is None else jax.tree.map(np.add, diag, d)
        counts = _summed_over_processes(data_counts(it))
        close = getattr(it, "close", None)
        if close:
            close()
        if total is None:
            return counts
        values = losses.combine(jax.device_get(total), self.objective.diffusion_weight)
        out = {k: float(v) for k, v in values.items()}
        out.update(self.diagnostics.finish(diag))
        out.update(counts)
        return out

    def write_samples(self, step: int, params) -> None:
        """A grid of images for config.train.sample_prompts in workdir/samples/ (the
        inference engine's code path, so samples show what generate would give).
        Sampled sharded on the training mesh with the params where they lie: every
        process takes part, the primary writes the files."""
        from tfusion.inference.model_sampler import write_sample_grid

        out = os.path.join(self.workdir, "samples", f"step_{step:08d}.png")
        write_sample_grid((self.objective.graphdef, params), self.config, self.tokenizer,
                          list(self.config.train.sample_prompts), out,
                          seed=self.config.train.seed)
        if self.primary:
            _log.info("samples written to %s", out)

    def final_evaluation(self, step: int, state) -> dict:
        """train.final_eval_suite (the `final_eval` given) on the sampling params (EMA
        where kept) at the end of the run: its metrics go to metrics.jsonl (split
        "final_eval") and the console; the evaluator writes its own files. Every
        process runs it on the sharded params (no gather); all get the same metrics."""
        start = time.perf_counter()
        flat = dict(self.final_eval(step, state.get("ema_params", state["params"])))
        flat["seconds"] = time.perf_counter() - start
        self.writer.write(step, flat, prefix="final_eval")
        if not self.primary:
            return flat
        lines = [f"  {k:48s} {v:.4f}" for k, v in sorted(flat.items())]
        _log.info("final evaluation (%s) at step %d:\n%s", self.config.train.final_eval_suite,
                  step, "\n".join(lines))
        return flat

    def _log_metrics(self, step: int, interval: list, seconds: float, flops: float,
                     counts: dict) -> dict:
        fetched = jax.device_get(interval)
        last = fetched[-1]
        out = {k: float(last[k]) for k in ("loss", "loss_lm", "loss_diffusion", "loss_text",
                                           "loss_image_tokens", "grad_norm", "lr") if k in last}
        tokens = sum(float(m["text_tokens"]) + float(m["patch_tokens"]) for m in fetched)
        out.update(text_tokens=int(last["text_tokens"]), patch_tokens=int(last["patch_tokens"]),
                   tokens_per_s=tokens / max(seconds, 1e-9),
                   step_s=seconds / len(fetched),
                   mfu=mfu.mfu(flops / len(fetched), seconds / len(fetched),
                               jax.device_count(), self.peak_flops),
                   skipped_total=int(last["nonfinite_total"]))
        out.update(_summed_over_processes(counts))
        self.writer.write(step, out)
        if self.primary:
            _log.info(console_line(step, self.config.train.steps, out))
        return out

    # --- the loop ---

    def run(self) -> TrainResult:
        if self.train_iterator_fn is None:
            raise ValueError("Trainer.run needs train_iterator_fn (launch/train_setup.py "
                             "make_trainer passes the data pipeline's)")
        lock = WorkdirLock(self.workdir).acquire() if self.primary else None
        preemption = _Preemption(float(self.config.train.get("preemption_timeout_s", 0)),
                                 self._describe_checkpoints)
        try:
            with preemption:
                return self._run(preemption)
        finally:
            if lock is not None:
                lock.release()
            preemption.finished()

    def _describe_checkpoints(self) -> str:
        steps = self.checkpointer.all_steps()
        return (f"newest checkpoint: step {max(steps)} in {self.checkpointer.directory}" if steps
                else f"no checkpoint in {self.checkpointer.directory}")

    def _run(self, preemption: _Preemption) -> TrainResult:
        cfg = self.config.train
        if self.checkpointer.all_steps():
            # Before config.json is overwritten and before anything compiles.
            check_resume_config(self.workdir, self.config)
        if self.primary:
            write_config(self.workdir, self.config)
        data_iterator = self._iterator(self.train_iterator_fn)
        preemption.waiting_on = "the checkpoint restore"
        state = self.restore_or_init(data_iterator)
        step = int(jax.device_get(state["step"]))
        self.writer = MetricsWriter(self.workdir, enabled=self.primary, resume_step=step)
        _log.info("mesh %s, %d processes, start at step %d of %d",
                  sharding.describe(self.mesh), jax.process_count(), step, cfg.steps)
        # The feed thread does numpy only (the FLOP count); the global device arrays
        # are built here, on the main thread: a helper thread's JAX work beside the
        # step starves a device's participant in its collectives (XLA:CPU aborts).
        processes = jax.process_count()
        feed = BatchFeed(data_iterator, prepare=lambda local: (
            local, _step_flops(self.config.model, local, processes)))
        # Waiting for data can be cut short by SIGTERM only in a single-process run:
        # with several, a process that skipped its step would leave the others inside
        # the step's collectives (the deadline covers that case).
        interruptible = jax.process_count() == 1
        # Agreeing on a SIGTERM across processes is an allgather: every step only
        # when it is free (one process), else every preemption_sync_every steps.
        sync_every = 1 if interruptible else int(cfg.get("preemption_sync_every", 10))
        # The first logged interval includes compilation time.
        interval, flops_sum, last = [], 0.0, {}
        tick, stopped, previous = time.perf_counter(), "done", None
        profiler = _Profiler(self.profile_window, self.workdir)
        try:
            while step < cfg.steps:
                if step % sync_every == 0 and distributed.any_process(preemption.requested):
                    preemption.waiting_on = "the preemption checkpoint"
                    self.save(step, state, feed.state)
                    stopped = "preempted"
                    break
                preemption.waiting_on = "the input pipeline (next training batch)"
                prepared = feed.next(lambda: interruptible and preemption.requested)
                if prepared is None:
                    continue  # SIGTERM while waiting: the check above saves and stops
                local_batch, batch_flops = prepared
                batch = distributed.global_batch(local_batch, self.mesh, self.table)
                preemption.waiting_on = f"train step {step + 1}"
                profiler.before(step + 1)
                state, metrics = self.step_fn(state, batch)
                step += 1
                profiler.after(step, metrics)
                flops_sum += batch_flops
                interval.append(metrics)
                # The previous step's counter: reading it does not wait for this step.
                if previous is not None:
                    self._check_nonfinite(step - 1, previous)
                previous = metrics
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.checkpointer.check_for_errors()  # a failed background save stops here
                    jax.block_until_ready(metrics)
                    now = time.perf_counter()
                    last = self._log_metrics(step, interval, now - tick, flops_sum,
                                             feed.data_counts)
                    interval, flops_sum, tick = [], 0.0, now
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    preemption.waiting_on = f"the held-out evaluation at step {step}"
                    ev = self.evaluate(state)
                    self.writer.write(step, ev, prefix="eval")
                    if self.primary:
                        _log.info(console_line(step, cfg.steps, ev, prefix="eval"))
                if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                    preemption.waiting_on = f"the sample grid at step {step}"
                    self.write_samples(step, state.get("ema_params", state["params"]))
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                    # While updates are being skipped, keep the last good checkpoint.
                    self._check_nonfinite(step, metrics)
                    if int(jax.device_get(metrics["nonfinite_run"])) == 0:
                        preemption.waiting_on = f"the checkpoint of step {step}"
                        self.save(step, state, feed.state)
            if stopped == "done" and previous is not None:
                self._check_nonfinite(step, previous)
            counts = _summed_over_processes(feed.data_counts)
            if stopped == "done" and cfg.get("final_eval_suite", ""):
                preemption.waiting_on = "the final evaluation"
                last["final_eval"] = self.final_evaluation(step, state)
            preemption.waiting_on = "the last checkpoint write"
            self.checkpointer.close()
        finally:
            profiler.stop()
            if not feed.close():
                _log.warning("the input pipeline did not stop within 5 s; left running")
            self.writer.close()
            self._close_checkpointer_quietly()
        if self.primary and counts:
            _log.info("data at step %d: %s", step, data_summary(counts))
        last["data"] = counts
        self.state = state
        return TrainResult(step=step, stopped=stopped, last_metrics=last)

    def _close_checkpointer_quietly(self) -> None:
        """On the way out of a failed run, let an in-flight save finish; its own error
        (if any) is logged, not raised over the one that stopped the run."""
        try:
            self.checkpointer.close()
        except Exception as e:
            _log.error("%s", e)

    def _check_nonfinite(self, step: int, metrics: dict) -> None:
        run = int(jax.device_get(metrics["nonfinite_run"]))
        if run >= self.config.train.max_nonfinite_steps:
            self.checkpointer.close()
            last_good = self.checkpointer.latest_step()
            raise NonFiniteError(
                f"stopping at step {step}: {run} non-finite steps in a row (loss or gradients "
                f"NaN/Inf; train.max_nonfinite_steps={self.config.train.max_nonfinite_steps}). "
                f"Last good checkpoint: step {last_good} in {self.checkpointer.directory}")


def profile_window(config) -> tuple[int, int] | None:
    """train.profile_steps as (first, last) train steps, or None; ConfigError naming
    the field when it is not 1 <= first <= last <= train.steps."""
    value = tuple(config.train.get("profile_steps", ()) or ())
    if not value:
        return None
    ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    if len(value) != 2 or not ints or not 1 <= value[0] <= value[1] <= config.train.steps:
        raise ConfigError("train.profile_steps", f"{value!r}: give (first, last) train steps "
                          f"with 1 <= first <= last <= train.steps ({config.train.steps}), "
                          "or () for no trace")
    return int(value[0]), int(value[1])


class _Profiler:
    """A jax.profiler trace of train steps first..last (train.profile_steps) in
    workdir/profile/ (workdir/profile/process_<i>/ when several processes trace: one
    host's processes would write the same file names). A resumed run traces what is
    left of the window."""

    def __init__(self, window: tuple[int, int] | None, workdir: str):
        self.first, self.last = window or (0, -1)
        self.directory = os.path.join(workdir, "profile")
        if jax.process_count() > 1:
            self.directory = os.path.join(self.directory, f"process_{jax.process_index()}")
        self.active = False

    def before(self, step: int) -> None:
        """`step` (1-based) is about to run."""
        if not self.active and self.first <= step <= self.last:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True
            _log.info("profiling train steps %d..%d into %s", step, self.last, self.directory)

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        if self.active:
            self.active = False
            jax.block_until_ready(outputs)  # the traced steps' device work, not just dispatch
            jax.profiler.stop_trace()


def _check_inputs(config, eval_iterator_fn, tokenizer, final_eval) -> None:
    """Every output the config asks for was given what it needs."""
    t = config.train
    for field, wanted, given, argument in (
            ("eval_every", t.eval_every, eval_iterator_fn, "eval_iterator_fn"),
            ("sample_every", t.sample_every, tokenizer, "tokenizer"),
            ("final_eval_suite", t.get("final_eval_suite", ""), final_eval, "final_eval")):
        if wanted and given is None:
            raise ValueError(f"train.{field}={wanted!r} needs the Trainer's {argument} "
                             "argument (launch/train_setup.py make_trainer builds it)")


def train(config, workdir: str, **kwargs) -> TrainResult:
    """Runs (or resumes) training in `workdir`; see Trainer for the keyword arguments."""
    return Trainer(config, workdir, **kwargs).run()
