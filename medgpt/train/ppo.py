"""The PPO rollout/update loop behind `medgpt ppo` (the recipe, with its references, is medgpt/stages/ppo.py).

One PPO step = one rollout + one update:
  rollout (no grad): sample responses to a batch of prompts -> score them -> old log-probs (policy), reference
      log-probs, values -> per-token KL-penalized rewards -> GAE -> whitened advantages;
  update: `ppo_epochs` passes over `num_mini_batches` shuffled mini-batches of that rollout, each a clipped policy
      loss + vf_coef x clipped value loss, one joint AdamW step (gradients clipped over both models together).

Tensors of a rollout are [B, L + R]: the prompt left-padded to L, the response right-padded to R. Per-token
quantities (log-probs, values, rewards, advantages, mask) cover the R response positions only; the mask is 1 up to
and including the first stop token, so nothing after an end-of-turn token is ever trained on or rewarded.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch

from medgpt.train import losses as L
from medgpt.train.checkpoint import add_scalars, load_checkpoint, load_weights, save_checkpoint, tensorboard
from medgpt.train.run import final_save, plot_loss
from medgpt.utils import MedGPTError, is_main_process, log, write_json


def disable_dropout(model) -> None:
    """PPO's log-prob ratios and values must be deterministic functions of the weights (Huang et al. 2024):
    dropout would make the rollout's old log-probs disagree with the update's even before any step."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class PPOTrainer:
    """Policy + value model + a prompt list + a reward function -> `train()`. Not a transformers.Trainer: PPO's
    step is a rollout plus several epochs of updates on it, which Trainer's one-batch-one-step loop cannot express."""

    def __init__(self, policy, value_model, tokenizer, records: list[dict], prompt_ids: list[list[int]], score_fn,
                 args, train, out: Path, stop_ids: list[int], ref_model=None, max_steps: int = 1):
        self.policy, self.value_model, self.ref_model = policy, value_model, ref_model
        self.tokenizer, self.records, self.prompt_ids, self.score_fn = tokenizer, records, prompt_ids, score_fn
        self.args, self.train_args, self.out, self.max_steps = args, train, Path(out), max_steps
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for m in (policy, value_model, ref_model):
            if m is not None:
                m.to(self.device)
                disable_dropout(m)
        self.stop_ids = torch.tensor(stop_ids, device=self.device)
        self.pad_id = tokenizer.pad_token_id
        self.kl_coef = args.kl_coef
        self.step, self.history = 0, []
        self.params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
        # One AdamW over both models: PPO's loss is pg_loss + vf_coef * vf_loss (as in TRL's PolicyAndValueWrapper);
        # vf_coef, not a second learning rate, balances the two.
        self.optimizer = torch.optim.AdamW(self.params, lr=train.learning_rate, weight_decay=train.weight_decay)
        from transformers import GenerationConfig, get_scheduler

        warmup = train.warmup if train.warmup >= 1 else math.ceil(train.warmup * max_steps)
        self.scheduler = get_scheduler(train.lr_scheduler, self.optimizer, num_warmup_steps=int(warmup),
                                       num_training_steps=max_steps)  # stepped once per PPO step
        # Pure sampling from the policy (no top-k/top-p/penalties, whatever the model's generation_config says):
        # the log-probs PPO optimizes must be those of the distribution the responses came from.
        self.gen_config = GenerationConfig(
            do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, max_new_tokens=args.max_new_tokens,
            eos_token_id=stop_ids, pad_token_id=self.pad_id, use_cache=True)

    # ------------------------------------------------------------------------------------------- forward passes

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference policy: a separate copy (full fine-tuning), the SFT adapter loaded a second time
        as `ref` (LoRA on top of --model.adapter), or the base under the LoRA adapters, switched off."""
        if self.ref_model is not None:
            yield self.ref_model
        elif "ref" in getattr(self.policy, "peft_config", {}):
            self.policy.set_adapter("ref")
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")  # also restores requires_grad on the trained adapter
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def logprobs(self, model, seq, attn, ctx: int, entropy: bool = False):
        """Log-probs of the response tokens seq[:, ctx:] (and their entropies), at the sampling temperature."""
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=seq.shape[1] - ctx + 1).logits
        logits = logits.float() / self.args.temperature  # Huang et al.: score with the sampling distribution
        lp, _ = L.token_logps(logits, seq[:, ctx - 1:])
        if not entropy:
            return lp
        logits = logits[:, :-1]
        ent = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
        return lp, ent

    def values(self, seq, attn, ctx: int):
        """V(prefix) before each response token: the value model's scalar head on every position's hidden state."""
        base = _unwrap(self.value_model)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = getattr(base, base.base_model_prefix)(input_ids=seq, attention_mask=attn, position_ids=pos,
                                                       use_cache=False).last_hidden_state
        return base.score(hidden[:, ctx - 1:-1]).squeeze(-1).float()

    def _chunks(self, n: int):
        size = max(1, self.train_args.batch_size // (self.args.num_mini_batches
                                                     * self.train_args.gradient_accumulation_steps))
        return [slice(i, i + size) for i in range(0, n, size)]

    # ------------------------------------------------------------------------------------------- rollout

    def batch(self, step: int) -> list[int]:
        """Prompt indices of PPO step `step`: epochs of seeded shuffles, so a resumed run sees the same prompts."""
        n, size, seed = len(self.prompt_ids), self.train_args.batch_size, self.train_args.seed
        orders: dict[int, list[int]] = {}
        for epoch in {j // n for j in range(step * size, (step + 1) * size)}:
            orders[epoch] = list(range(n))
            random.Random(seed + epoch).shuffle(orders[epoch])
        return [orders[j // n][j % n] for j in range(step * size, (step + 1) * size)]

    @torch.no_grad()
    def rollout(self, idx: list[int]) -> dict:
        prompts = [self.prompt_ids[i] for i in idx]
        ctx = max(len(p) for p in prompts)
        query = torch.full((len(prompts), ctx), self.pad_id, dtype=torch.long)
        qmask = torch.zeros_like(query)
        for i, p in enumerate(prompts):  # left padding: every response starts at column ctx
            query[i, ctx - len(p):], qmask[i, ctx - len(p):] = torch.tensor(p), 1
        query, qmask = query.to(self.device), qmask.to(self.device)
        self.policy.eval()
        self.value_model.eval()
        out = self.policy.generate(input_ids=query, attention_mask=qmask, generation_config=self.gen_config)
        response = out[:, ctx:]
        # Keep each response up to and including its first stop token; everything after is padding.
        stop = torch.isin(response, self.stop_ids)
        ended = stop.any(-1)
        first = torch.where(ended, stop.int().argmax(-1), response.shape[1])
        mask = torch.arange(response.shape[1], device=self.device)[None] <= first[:, None]
        response = torch.where(mask, response, self.pad_id)
        seq, attn = torch.cat([query, response], 1), torch.cat([qmask, mask.long()], 1)

        logprobs, ref_logprobs, values = [], [], []
        for s in self._chunks(len(idx)):
            logprobs.append(self.logprobs(self.policy, seq[s], attn[s], ctx))
            with self.reference() as ref:
                ref_logprobs.append(self.logprobs(ref, seq[s], attn[s], ctx))
            values.append(self.values(seq[s], attn[s], ctx))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

        texts = [self.tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(response, mask)]
        scores, parts = self.score_fn([self.records[i] for i in idx], texts)
        scores = scores.to(self.device)
        final = scores if self.args.missing_eos_penalty is None else \
            L.apply_missing_eos_penalty(scores, ended, self.args.missing_eos_penalty)
        rewards, kl = L.kl_penalized_rewards(final, logprobs, ref_logprobs, mask, self.kl_coef, self.args.kl_estimator)
        if self.args.whiten_rewards:
            rewards = L.whiten(rewards, mask, shift_mean=False)
        advantages, returns = L.gae(rewards, values, mask, self.args.gamma, self.args.lam)
        advantages = L.whiten(advantages, mask)  # after the returns are taken (TRL, Huang et al.)
        seq_kl = kl.sum(-1).mean().item()
        stats = {"score": scores.mean().item(), "reward": final.mean().item(), "kl": seq_kl,
                 "non_score_reward": -self.kl_coef * seq_kl, "response_length": mask.sum(-1).float().mean().item(),
                 "ended": ended.float().mean().item(), **{f"score/{k}": v for k, v in parts.items()}}
        return dict(seq=seq, attn=attn, ctx=ctx, mask=mask, logprobs=logprobs, values=values,
                    advantages=advantages, returns=returns, stats=stats)

    # ------------------------------------------------------------------------------------------- update

    def update(self, roll: dict) -> dict:
        a, n, ctx = self.args, roll["seq"].shape[0], roll["ctx"]
        mb = n // a.num_mini_batches
        self.policy.train()  # dropout is off; train() only lets gradient checkpointing act
        self.value_model.train()
        sums: dict[str, float] = {}
        count = 0
        for _ in range(a.ppo_epochs):
            order = torch.randperm(n, device=self.device)
            for start in range(0, n, mb):
                rows = order[start:start + mb]
                micro = self._chunks(len(rows))
                for s in micro:
                    r = rows[s]
                    seq, attn, mask = roll["seq"][r], roll["attn"][r], roll["mask"][r]
                    lp, ent = self.logprobs(self.policy, seq, attn, ctx, entropy=True)
                    v = self.values(seq, attn, ctx)
                    pg_loss, pm = L.ppo_policy_loss(lp, roll["logprobs"][r], roll["advantages"][r], mask, a.cliprange)
                    vf_loss, vm = L.ppo_value_loss(v, roll["values"][r], roll["returns"][r], mask, a.cliprange_value)
                    loss = pg_loss + a.vf_coef * vf_loss
                    (loss / len(micro)).backward()
                    stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "loss": loss,
                             "entropy": L.masked_mean(ent.detach(), mask), **pm, **vm}
                    for k, t in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(t.detach())
                    count += 1
                if self.train_args.max_grad_norm > 0:  # 0: no clipping (clip_grad_norm_ would zero every gradient)
                    torch.nn.utils.clip_grad_norm_(self.params, self.train_args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {k: v / max(count, 1) for k, v in sums.items()}

    def adapt_kl(self, kl: float) -> None:
        """Ziegler et al. 2019's adaptive KL controller: move kl_coef so the per-sequence KL tracks target_kl."""
        if self.args.target_kl is None:
            return
        error = max(-0.2, min(0.2, kl / self.args.target_kl - 1))
        self.kl_coef *= 1 + error * self.train_args.batch_size / self.args.kl_horizon

    # ------------------------------------------------------------------------------------------- loop

    def train(self, resume_from: str | None = None) -> dict:
        from tqdm.auto import tqdm

        if resume_from:
            self.load_checkpoint(Path(resume_from))
        writer = tensorboard(self.train_args, self.out)
        started = time.time()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="ppo", disable=not is_main_process())
        while self.step < self.max_steps:
            step_started = time.perf_counter()
            roll = self.rollout(self.batch(self.step))
            stats = {**roll["stats"], **self.update(roll)}
            stats["kl_coef"], stats["learning_rate"] = self.kl_coef, self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.adapt_kl(roll["stats"]["kl"])
            self.step += 1
            stats["seconds"] = time.perf_counter() - step_started  # rollout + update
            self.history.append({"step": self.step, **stats})
            add_scalars(writer, "train", stats, self.step)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", loss=f"{stats['loss']:.3f}")
            if self.step % max(self.train_args.logging_steps, 1) == 0 or self.step == 1:
                bar.write(json.dumps({k: round(v, 5) for k, v in self.history[-1].items()}))
            if self.train_args.save_steps > 0 and self.step % self.train_args.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if writer is not None:
            writer.close()
        return self.metrics(time.time() - started)

    def metrics(self, runtime: float) -> dict:
        h = self.history
        if not h:
            raise MedGPTError("PPO ran no step: --train.max_steps is already reached by the checkpoint resumed from.")
        k = min(5, len(h))
        # the first step warms up (thread pools, allocator): as in the trainer stages, it is left out (a resumed
        # run's earlier steps count as they were timed then)
        timed = [r["seconds"] for r in h if "seconds" in r]
        timed = timed[1:] or timed
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        return {"train_loss": mean(h, "loss"), "score": h[-1]["score"], "kl": h[-1]["kl"],
                "score_first": mean(h[:k], "score"), "score_last": mean(h[-k:], "score"),
                "response_length": h[-1]["response_length"], "train_runtime": runtime, "global_step": self.step,
                "seconds_per_step": sum(timed) / len(timed) if timed else float("nan")}

    # ------------------------------------------------------------------------------------------- saving

    def state(self) -> dict:
        return {"step": self.step, "kl_coef": self.kl_coef, "history": self.history}

    def save_models(self, path: Path) -> None:
        """Policy (full safetensors or adapter) in `path`, value model in `path/value_model`."""
        extra = {"selected_adapters": ["default"]} if hasattr(self.policy, "peft_config") else {}
        self.policy.save_pretrained(path, **extra)  # `ref` (a frozen copy of the SFT adapter) is not saved
        self.value_model.save_pretrained(path / "value_model")

    def save_checkpoint(self) -> None:
        """checkpoint-N (train/checkpoint.py): policy and value model, optimizer, scheduler, RNGs, step, KL
        coefficient and history."""
        if not is_main_process():
            return
        ckpt = save_checkpoint(self.out, self.step, self.save_models, self.optimizer, self.state(),
                               self.train_args.save_total_limit, self.scheduler)
        log(f"saved {ckpt}")

    def load_checkpoint(self, ckpt: Path) -> None:
        load_weights(self.policy, ckpt)
        load_weights(self.value_model, ckpt / "value_model")
        state = load_checkpoint(ckpt, self.optimizer, self.device, self.scheduler)
        self.step, self.kl_coef, self.history = state["step"], state["kl_coef"], state["history"]
        log(f"resumed at PPO step {self.step} of {self.max_steps}")

    def save_final(self, tokenizer, metrics: dict) -> None:
        if not is_main_process():
            return
        with final_save(self.out) as staging:
            self.save_models(staging)
            tokenizer.save_pretrained(staging)
            write_json(staging / "metrics.json", metrics)
            write_json(staging / "trainer_state.json", self.state())
            plot_loss(self.history, staging / "loss.png", keys=("score", "policy_loss", "value_loss"),
                      title=self.out.name)
        log(f"saved policy, value_model/, tokenizer, metrics.json, trainer_state.json and loss.png to {self.out}")
