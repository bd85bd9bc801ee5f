"""The RL trainer: rollout -> update -> periodic evaluation -> checkpoint, resumable.

One recipe serves every algorithm: the configured step (found by name in
`evolving_rl.algorithms`) turns a batch of training tasks into Samples (GRPO: G episodes per
task; Evolving-RL: the four stages), then one optimizer step.

A checkpoint holds model, optimizer, RNG states, step, data cursor, the algorithm's state and
the run's skill bank; it is written to a temporary directory and renamed, so a run killed at
any moment resumes from the last complete one with its curves continuous: metrics rows
written after that checkpoint are dropped, and the skill bank is rolled back with it so
replayed steps do not store their skills twice. A checkpoint that cannot be read (a
truncated file) is skipped for the one before it, saying so.

Several processes (torchrun / `accelerate launch`): every process builds the same run, plays
its block of each step's episodes (`evolving_rl.distributed`), holds the whole step's samples
after the step gathers them, and takes the same optimizer step (the updater shards the loss
and sums the gradients). The first process alone writes: config, metrics, checkpoints, skill
bank, evaluations; the others resume from what it wrote.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from evolving_rl import algorithms, distributed
from evolving_rl.algorithms.base import StepParts
from evolving_rl.builders import build_policy, build_pool, build_reference, build_rollout, build_suite
from evolving_rl.common import TaskCursor, check_no_overlap, prompt_mismatch, snapshot_sqlite
from evolving_rl.config import RunConfig, save_config
from evolving_rl.evaluate import Evaluator, check_bank_no_overlap, compare_table, format_table, load_results

# Metric namespaces (CleanRL's `losses/` and `charts/`): one key, one meaning.
NAMESPACES = ("rollout/", "extractor/", "solver/", "loss/", "time/")


def namespaced_update(stats: dict) -> dict:
    """The updater's numbers under `loss/` (per-role terms are `loss/<role>/...`)."""
    out = {}
    for k, v in stats.items():
        if not isinstance(v, (int, float)):
            continue
        out[k if k.startswith("loss/") else f"loss/{k}"] = v
    return out


def merge_metrics(*parts: dict) -> dict:
    """One row from several sources; a key two sources both set is a bug, not an overwrite."""
    row: dict = {}
    for part in parts:
        clash = sorted(set(row) & set(part))
        if clash:
            raise ValueError(f"metric keys set twice in one step: {clash}")
        row.update(part)
    return row


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is complete."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: Path) -> tuple[str | None, dict | None]:
    """(why it cannot be resumed from, None) or (None, its trainer state). The trainer state is
    loaded once, here: at 7B its optimizer moments are tens of GB."""
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json unreadable ({type(e).__name__}: {e})", None
    model = path / "model"
    if not (model / "config.json").is_file():
        return "model/config.json missing", None
    for f in model.glob("*.safetensors"):
        if (why := _safetensors_problem(f)) is not None:
            return why, None
    try:
        blob = torch.load(path / "trainer.pt", weights_only=False, map_location="cpu")
        blob["optimizer"], blob["rng"]
    except Exception as e:  # a truncated zip archive raises RuntimeError, a missing file OSError
        return f"trainer.pt unreadable ({type(e).__name__}: {str(e)[:200]})", None
    return None, blob


def _safetensors_problem(f: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes: a
    truncated file is shorter than the header says, found without reading the tensors."""
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{f.name} unreadable ({type(e).__name__})"
    if f.stat().st_size < 8 + n + end:
        return f"{f.name} truncated ({f.stat().st_size} bytes, header says {8 + n + end})"
    return None


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, console=None):
        from accelerate import Accelerator

        from evolving_rl.algorithms.grpo import GRPOUpdater

        self.cfg = cfg
        self.print = (lambda x: console.print(x, soft_wrap=True, highlight=False, markup=False)) if console is not None else print
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not resume and self.metrics_path.exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: pass --resume to continue it, or choose another run_dir")

        # Inputs first: nothing is written until the suite, the splits and the algorithm's
        # settings have been checked, so a refused run leaves no directory behind.
        self.suite = build_suite(cfg)
        self.train_tasks = self.suite.tasks("train")
        if not self.train_tasks:
            raise ValueError(f"env.games_dir {cfg.env.games_dir!r}: the train split is empty")
        self.eval_tasks = {s: self.suite.tasks(s) for s in cfg.eval.splits}
        check_no_overlap(self.train_tasks, self.eval_tasks, "training pool")
        step_cls = algorithms.lookup(cfg.algorithm)
        step_cls.check(cfg, self.train_tasks)
        self._blob = None  # the trainer state of the checkpoint found below, until it is applied
        latest = self._find_checkpoint() if resume else None

        torch.manual_seed(cfg.seed)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process  # the one process that writes and evaluates
        if self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ValueError(
                f"accelerate distributed_type: {self.accelerator.distributed_type.value} is not supported: every "
                "process holds whole weights (its rollouts generate from them) and the trainer shards itself (train.sharding: "
                "zero1, or fsdp for weights and gradients too); launch with configs/accelerate/multi_gpu_8.yaml (MULTI_GPU) "
                "or torchrun")
        self.fully_sharded = cfg.train.sharding == "fsdp" and self.accelerator.num_processes > 1
        if self.fully_sharded and cfg.model.lora.enabled:
            raise ValueError("train.sharding: fsdp shards a full fine-tune; LoRA (model.lora.enabled) trains on one GPU "
                             "with whole weights: set train.sharding: zero1")
        if self.fully_sharded and cfg.model.backend != "hf":
            raise ValueError(f"train.sharding: fsdp needs model.backend: hf (got {cfg.model.backend!r}): syncing "
                             "sharded weights into a vLLM engine is not built; set train.sharding: zero1")
        if not self.main:
            self.print = lambda x: None
        # LoRA resumes from the base weights plus the saved adapter (trainer.pt), not from the
        # merged model: fresh adapters on merged weights would not match the optimizer state.
        model_path = str(latest / "model") if latest and not cfg.model.lora.enabled else None
        self.policy = build_policy(cfg, path=model_path, device=self.accelerator.device, training=True)
        if warn := prompt_mismatch(cfg, cfg.model.path):
            self.print(f"warning: {warn}")
        # The KL anchor is the *initial* policy, also after a resume.
        self.reference = build_reference(cfg, self.policy, resumed=bool(latest), device=self.accelerator.device)
        if self.fully_sharded:  # after the reference's copy of the whole weights
            if self.policy.autocast_dtype is not None:  # read only, computed in it: same log-probs
                distributed.store_in_compute_dtype(self.reference.model, self.policy.autocast_dtype)
            distributed.fully_shard_model(self.policy.model, self.policy.autocast_dtype)
        self.updater = GRPOUpdater(self.policy, self.reference, cfg.grpo, step_cls.roles(cfg), accelerator=self.accelerator,
                                   optimizer=self._sharded_optimizer(), fully_sharded=self.fully_sharded)
        self.pool = build_pool(cfg)
        try:
            self.rollout = build_rollout(cfg, self.policy, self.pool)
            self.step = 0
            self.initial = None
            self.finished: list | None = None  # the final results of a run resumed after it ended
            self.cursor = TaskCursor(self.train_tasks, cfg.seed)
            self.algorithm = step_cls.setup(StepParts(cfg, self.policy, self.rollout, self.cursor, self.train_tasks,
                                                      self.run_dir))
            if self.bank_path is not None and self.bank_path.is_file():
                # A shared library.path the run will add to and ship: it must not already hold
                # skills extracted from the tasks this run evaluates on.
                check_bank_no_overlap(self.bank_path, self.eval_tasks)
        except BaseException:
            self.pool.close()
            raise

        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.evaluator = Evaluator(cfg, self.suite, self.rollout, self.policy, self.run_dir, self.print,
                                   bank=self.bank_path)
        if resume:
            self._resume(latest)
        self.tb = self._tensorboard()
        self.wandb = self._wandb()

    # -- setup helpers ---------------------------------------------------------------------

    def _sharded_optimizer(self):
        """Over several processes, AdamW as ZeRO stage 1: each process keeps the Adam moments of
        its 1/n of the weights (7B in fp32: 56 GB of moments, 7 GB per GPU on 8) and broadcasts
        the weights it stepped; weights and gradients stay whole on every process, so rollouts
        generate from them as in one process. None (the updater's plain AdamW) in one process, and
        under train.sharding: fsdp, where the weights it is built on are shards already."""
        if self.accelerator.num_processes == 1 or self.fully_sharded:
            return None
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from evolving_rl.algorithms.grpo import trainable_parameters

        g = self.cfg.grpo
        return ZeroRedundancyOptimizer(trainable_parameters(self.policy), optimizer_class=torch.optim.AdamW, lr=g.lr,
                                       weight_decay=g.weight_decay)

    @property
    def bank_path(self) -> Path | None:
        """The skill bank this run ships (written by training, read by evaluations)."""
        p = getattr(self.algorithm, "library_path", None)
        return Path(p) if p else None

    def _tensorboard(self):
        if not self.cfg.train.tensorboard or not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    def _wandb(self):
        if not self.cfg.train.wandb or not self.main:
            return None
        try:
            import wandb
        except ImportError:
            raise ValueError("train.wandb: wandb is not installed; pip install 'evolving-rl[wandb]' or set train.wandb=false") from None
        return wandb.init(project="evolving-rl", name=self.run_dir.name, config=self.cfg.model_dump(mode="json"),
                          dir=str(self.run_dir), resume="allow")

    # -- logging ---------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        if not self.main:
            return
        row = {"step": self.step, "time": time.time(), **row}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        kind = row.get("kind", "train")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if kind == "eval":  # one curve per (tag family, split, protocol)
            scalars = {f"eval/{row['split']}/{row['protocol']}/success": row["success"]}
        if self.wandb is not None:
            self.wandb.log(scalars, step=self.step)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, self.step)

    # -- the loop --------------------------------------------------------------------------

    def evaluate(self, tag: str) -> list:
        """Periodic evaluations play each task once; the final one uses eval.repeats. The first
        process evaluates alone (generation needs no other process: each holds whole weights;
        under fsdp every process gathers them, the others then wait)."""
        with distributed.whole_weights(self.policy.model):
            return self._evaluate(tag)

    def _evaluate(self, tag: str) -> list:
        if not self.main:
            return []
        final = tag == "final"
        cap = self.cfg.eval.max_tasks if final else (self.cfg.train.eval_max_tasks or self.cfg.eval.max_tasks)
        results = self.evaluator.run(tag, self.step, repeats=None if final else 1, cap=cap)
        for r in results:
            self.log({"kind": "eval", "tag": tag, "split": r.split, "protocol": r.protocol,
                      "success": r.overall.success, "n": r.overall.n})
        return results

    def fit(self) -> list:
        cfg = self.cfg
        if self.finished is not None:  # resumed after the final evaluation: nothing left to run
            self.print(f"{self.run_dir}: finished at step {self.step}; not re-running the final evaluation")
            self._print_summary(self.finished)
            return self.finished
        if self.step == 0 and cfg.train.eval_initial:
            self.initial = self.evaluate("initial")
            self.print(format_table(self.initial, "Before RL (greedy)"))
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            pool_before = dict(getattr(self.pool, "stats", {}))
            with distributed.whole_weights(self.policy.model):  # fsdp: gathered for the rollouts, then freed
                samples, info = self.algorithm.collect(self.step)
            t1 = time.perf_counter()
            stats = namespaced_update(self.updater.update(samples)) if samples else {"loss/skipped": 1}
            timing = {"time/collect_s": t1 - t0, "time/update_s": time.perf_counter() - t1}
            # Engine workers that crashed or hung are retried silently by the pool: count them.
            pool = {f"rollout/pool_{k}": v - pool_before.get(k, 0) for k, v in getattr(self.pool, "stats", {}).items()
                    if isinstance(v, (int, float))}
            self.step += 1
            self.log({"kind": "train", **merge_metrics(info, stats, timing, pool)})
            loss = stats.get("loss/total", stats.get("loss/loss", float("nan")))
            self.print(f"step {self.step}/{cfg.train.steps}  success {info.get('solver/success', 0):.3f}  "
                       f"loss {loss:.4f}  {time.perf_counter() - t0:.1f}s")
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate(f"step{self.step}")
            if self.step % cfg.train.save_every == 0 or self.step == cfg.train.steps:
                self.save()
        final = self.evaluate("final")
        # Only now is the run done: a resume after this point must not evaluate (or log) again.
        if self.main:
            self._write_atomic(self.ckpt_dir / "finished", json.dumps({"step": self.step}))
        self._print_summary(final)
        return final

    def _print_summary(self, final: list) -> None:
        self.print(format_table(final, f"After {self.step} RL steps (greedy)"))
        if self.initial:
            self.print(compare_table(self.initial, final, f"Success before vs after {self.step} {self.cfg.algorithm} steps"))

    def close(self) -> None:
        self.pool.close()
        if hasattr(self.algorithm, "close"):
            self.algorithm.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()

    # -- checkpoints -----------------------------------------------------------------------

    def _find_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: the one `latest` names, else (it is unreadable) the
        one before it; each one skipped is reported with the reason."""
        if not self.ckpt_dir.is_dir():
            return None
        pointer = self.ckpt_dir / "latest"
        named = self.ckpt_dir / pointer.read_text().strip() if pointer.is_file() else None
        found = sorted((p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and p.suffix != ".tmp"), reverse=True)
        order = ([named] if named is not None and named.is_dir() else []) + [p for p in found if p != named]
        for path in order:
            why, self._blob = read_checkpoint(path)
            if why is None:
                if path != order[0]:
                    self.print(f"resuming from the previous complete checkpoint {path.name}")
                return path
            self.print(f"warning: checkpoint {path} is unusable ({why}); trying an earlier one")
        return None

    def save(self) -> Path | None:
        if hasattr(self.updater.optimizer, "consolidate_state_dict"):  # ZeRO: every process sends its share
            self.updater.optimizer.consolidate_state_dict(to=0)
        whole = distributed.full_state(self.policy.model, self.updater.optimizer) if self.fully_sharded else None
        if not self.main:  # every process holds the same weights and RNGs; the first writes them
            return None
        name = f"step_{self.step:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if whole is not None:  # fsdp: the gathered float32 weights, as one process would write them
            self._save_whole(tmp / "model", whole[0])
        else:
            self.policy.save(tmp / "model")
        torch.save(
            {
                "optimizer": whole[1] if whole is not None else self.updater.optimizer.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "algorithm": self.algorithm.state_dict(),
                "adapter": self._adapter_state(),
            },
            tmp / "trainer.pt",
        )
        if self.bank_path is not None and self.bank_path.is_file():
            snapshot_sqlite(self.bank_path, tmp / "skills.sqlite")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "cursor": self.cursor.state()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._write_atomic(self.ckpt_dir / "latest", name)
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
        for old in done[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _save_whole(self, out: Path, weights: dict) -> None:
        model = self.policy.model
        model.save_pretrained(out, state_dict=weights)
        self.policy.tokenizer.save_pretrained(out)
        # save_pretrained names the class it was called on: FSDP2's wrapper (FSDPLlamaForCausalLM)
        config = json.loads((out / "config.json").read_text())
        config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def _write_atomic(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def _adapter_state(self) -> dict | None:
        if not self.cfg.model.lora.enabled:
            return None
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.policy.model).items()}

    def _resume(self, path: Path | None) -> None:
        if path is None:
            if self.metrics_path.exists() or (self.bank_path and self.bank_path.exists()):
                self.print(f"{self.run_dir}: no complete checkpoint to resume from; starting again at step 0 "
                           "(metrics and skills written before are dropped)")
            if self.main:
                self._trim_metrics(keep_through=None)
                self._restore_bank(None)
                (self.ckpt_dir / "finished").unlink(missing_ok=True)
            return
        state = json.loads((path / "state.json").read_text())
        self.step = state["step"]
        self.cursor = TaskCursor(self.train_tasks, self.cfg.seed, **state["cursor"])
        self.algorithm.cursor = self.cursor
        blob, self._blob = self._blob, None
        if blob.get("adapter") is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy.model, blob["adapter"])
        self._load_optimizer(blob["optimizer"], path)
        random.setstate(blob["rng"]["python"])
        np.random.set_state(blob["rng"]["numpy"])
        torch.set_rng_state(blob["rng"]["torch"])
        self.algorithm.load_state_dict(blob.get("algorithm", {}))
        marker = self.ckpt_dir / "finished"
        done = json.loads(marker.read_text()).get("step") if marker.is_file() else None
        final_json = self.run_dir / "eval" / "final.json"
        if done == self.step and self.step >= self.cfg.train.steps and final_json.is_file():
            self.finished = load_results(final_json)
        if self.main:  # the other processes only read what the first one wrote
            self._restore_bank(path / "skills.sqlite")
            if self.finished is None:
                marker.unlink(missing_ok=True)
            self._trim_metrics(keep_through=self.step, keep_final=self.finished is not None)
        initial = self.run_dir / "eval" / "initial.json"
        if initial.is_file():
            self.initial = load_results(initial)
        self.print(f"resumed from {path} at step {self.step}")

    def _load_optimizer(self, state: dict, path: Path) -> None:
        # fsdp writes the state keyed by parameter names, one process and zero1 by position
        by_name = any(isinstance(k, str) for k in state.get("state", {}))
        if by_name != self.fully_sharded and state.get("state"):
            wrote, now = ("fsdp", "zero1 or one process") if by_name else ("zero1 or one process", "fsdp")
            raise ValueError(f"{path}: its optimizer state was written under train.sharding {wrote}, this run uses "
                             f"{now}; resume with the train.sharding (and process count > 1 for fsdp) that wrote it")
        if self.fully_sharded:
            distributed.load_full_optimizer_state(self.policy.model, self.updater.optimizer, state)
        else:
            self.updater.optimizer.load_state_dict(state)

    def _trim_metrics(self, keep_through: int | None, keep_final: bool = False) -> None:
        """Drop rows written after the checkpoint (and a final evaluation that will run again),
        so curves continue without a seam; None drops every row (no checkpoint: step 0 again)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for ln in self.metrics_path.read_text().splitlines():
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
            if keep_through is None or row.get("step", 0) > keep_through:
                continue
            if row.get("tag") == "final" and not keep_final:
                continue
            keep.append(ln)
        self._write_atomic(self.metrics_path, "".join(r + "\n" for r in keep))

    def _restore_bank(self, snapshot: Path | None) -> None:
        """Roll the skill bank back to the checkpoint, so replayed steps store their skills once."""
        bank = self.bank_path
        if bank is None:
            return
        if hasattr(self.algorithm, "close"):
            self.algorithm.close()  # no open connection while the file is replaced
        if snapshot is not None and snapshot.is_file():
            snapshot_sqlite(snapshot, bank)
        elif bank.parent.resolve() == self.run_dir.resolve():  # the run's own bank, empty at that checkpoint
            for suffix in ("", "-wal", "-shm"):
                Path(str(bank) + suffix).unlink(missing_ok=True)
        elif bank.exists():
            self.print(f"warning: library.path {bank} is shared and has no snapshot in this checkpoint; "
                       "replayed steps may store their skills in it again")
