"""The recipe GRPO and RLOO share: online RL over prompts, replies sampled in groups, scored by reward sources.

Both stages differ only in their options and in how a group turns rewards into advantages (TRL's GRPOTrainer and
RLOOTrainer do that part); everything around the trainer is here once.
"""

from __future__ import annotations


def run_group_rl(cfg, section: str, config_cls, trainer_cls, options: dict, why_two: str,
                 why_together: str) -> int:
    """Validate data (prompt records; preference and chat data become prompts, `answer` is kept for answer_match)
    -> check rewards and batch shape -> tokenizer + template (TRL renders prompts with the tokenizer's chat
    template, which `apply_template` makes ours) -> prompts that fit -> reward sources -> policy (+LoRA) -> the
    TRL trainer (generation with transformers; no vLLM) -> save.

    `section` names the stage's options (cfg.grpo, cfg.rloo); `options` are its TRL config fields beyond the shared
    ones; the two `why` texts say what a group is for (see check_groups)."""
    from medgpt.data.prepare import prompt_dataset
    from medgpt.data.templates import apply_template, get_template_for, stop_token_ids
    from medgpt.data.validate import load_splits
    from medgpt.model.load import load_model, load_tokenizer
    from medgpt.train import run as R
    from medgpt.train.rewards import build_rewards, check_groups, check_rewards

    own = getattr(cfg, section)
    # Data, rewards and batch shape first: a bad file, a typo in a reward name or a batch that cannot hold
    # whole groups fails in seconds, before any model loads.
    train_records, eval_records, invalid = load_splits(cfg.data, "prompt", purpose=section, seed=cfg.train.seed)
    check_rewards(cfg.reward, train_records)
    check_groups(cfg.train, section, own.num_generations, own.max_completion_length, has_eval=bool(eval_records),
                 why_two=why_two, why_together=why_together)

    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    apply_template(tokenizer, template)  # TRL renders prompts with the tokenizer's template: make it exactly ours
    max_prompt = cfg.train.max_length - own.max_completion_length
    train_ds = prompt_dataset(train_records, template, tokenizer, max_prompt, "train", cfg.data.overlong)
    eval_ds = prompt_dataset(eval_records, template, tokenizer, max_prompt, "eval", cfg.data.overlong) \
        if eval_records else None
    reward_funcs, reward_weights = build_rewards(cfg.reward, template=template, max_length=cfg.train.max_length)

    model = load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing)
    # Replies end at the template's end-of-turn token (<|im_end|>, ...), not only at the tokenizer's eos; TRL
    # stops generation at every eos id the model's generation config declares.
    model.generation_config.eos_token_id = stop_token_ids(template, tokenizer)
    R.log_parameters(model)

    shared = ("num_generations", "max_completion_length", "beta", "temperature", "top_p", "epsilon",
              "epsilon_high", "num_iterations", "mask_truncated_completions")
    args = config_cls(**R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None),
                      **{k: getattr(own, k) for k in shared}, **options,
                      reward_weights=reward_weights, use_vllm=False)
    trainer = trainer_cls(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_ds,
                          eval_dataset=eval_ds, processing_class=tokenizer, callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
