"""Run a recipe of medgpt commands, each step's output feeding the next; re-running skips completed steps.

    medgpt pipeline configs/pipeline/qwen2.5-0.5b-lora.yaml
    medgpt pipeline configs/pipeline/qwen2.5-0.5b-lora.yaml --from_step dpo      # or --from dpo
    medgpt pipeline configs/pipeline/qwen2.5-0.5b-lora.yaml --dry_run --output_dir outputs/try

The recipe is this command's config file (format: docs/pipeline.md): `output_dir`, `vars` and `steps`, each
step a medgpt command with an optional config YAML and `--key value` args, `${var}` and
`${steps.NAME.output_dir}` filled in. Recipe: load -> check every step (command, keys, types, references) by
parsing its command line with the command's own Config, before anything runs -> for each step: skip it when
complete, else run it in this process (`medgpt.cli.main`) -> record it -> report.md.

- A step is complete when its dir holds `pipeline_step.json` (written only after it succeeded) with the same
  resolved config the recipe gives now, and the artifacts of a finished run (weights + metrics.json, tokenizer.json,
  meta.json, ...). Once a step runs, every step after it runs too: its inputs may have changed.
- A step that is not complete starts over with --overwrite (only in dirs inside output_dir, or that the
  pipeline wrote), so a run interrupted mid-step is simply run again.
- `sample` steps (`medgpt sample`: greedy answers to a few questions, samples.jsonl) are shown in report.md with
  their answers. A command module may define `check_settings(cfg)`: cheap checks of its settings, run here before any
  step (e.g. a sample step without questions).
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medgpt.config import arg, build, flatten, iter_fields, load_yaml, parse_argv, to_dict
from medgpt.utils import MedGPTError, atomic_write, is_main_process, log, write_json

MARKER = "pipeline_step.json"  # in a step's dir after it succeeded: its argv, resolved config, wall time
REPORT, SUMMARY = "report.md", "summary.json"
STEP_KEYS = ("name", "command", "config", "args")
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# What a finished run leaves in its dir (a tuple: any one of them). Other commands: the marker alone counts.
ARTIFACTS: dict[str, list] = {
    **{c: ["metrics.json", "config.yaml", WEIGHTS] for c in ("pt", "sft", "rm", "dpo", "orpo", "simpo", "kto",
                                                             "grpo", "rloo", "ppo")},
    "tokenizer train": ["tokenizer.json"], "tokenizer extend": ["tokenizer.json"], "pack": ["meta.json"],
    "merge": ["config.json", WEIGHTS], "sample": ["samples.jsonl"], "eval": ["metrics.json", "report.md"],
}
KEY_METRICS = ("loss", "perplexity", "accura", "margin", "reward", "score", "kl", "rouge_l", "global_step")
REF = re.compile(r"\$\{([^}]*)\}")


@dataclass
class Config:
    steps: list[Any] = arg(factory=list, help="The steps, in order; each {name, command, config, args} "
                           "(docs/pipeline.md).")
    vars: dict[str, Any] = arg(factory=dict, help="Values the steps use as ${name} or ${vars.name}. "
                               "--vars k=v,k2=v2 replaces the recipe's vars as a whole.")
    output_dir: str = arg("", "Each step writes to <output_dir>/<step name> unless its args set output_dir; "
                          "report.md goes here.")
    from_step: Optional[str] = arg(None, "Rerun this step and every step after it, even when complete "
                                   "(alias: --from).")
    only: list[str] = arg(factory=list, help="Run just these steps, even when complete; leave the others as "
                          "they are.")
    dry_run: bool = arg(False, "Print each step's command and whether it would run; run nothing.")
    isolate: bool = arg(False, "Run each step in its own Python process (all memory freed between steps) "
                        "instead of in this one.")
    goals: dict[str, str] = arg(factory=dict, help="What the recipe should achieve, checked in report.md and "
                                "summary.json (goals_met): NAME: SPEC per summary figure (heldout_ppl, unsafe_rate, "
                                "over_refusal, mcq_accuracy, rouge_l), SPEC a change from the first eval to the last "
                                "('-10%': relative, '-25pt': points of a rate) or a bound on the last ('<= 0.1').")
    recipe: list[str] = arg(factory=list, help="The recipe file, when it is not the first argument (a first "
                            "YAML argument is read as this command's config, which is the same thing).")


@dataclass
class Step:
    index: int
    name: str
    command: str            # "sft", "tokenizer train", "sample", ...
    argv: list[str]         # after the command words, without the --overwrite a rerun adds
    config: dict            # the resolved config: what "complete" is checked against
    out: Path
    overwritable: bool      # the command has --overwrite
    refs: set[str]          # earlier steps whose outputs it uses
    parsed: Any = None
    status: str = "pending"
    wall: Optional[float] = None

    def line(self, extra: tuple[str, ...] = ()) -> str:
        return "medgpt " + shlex.join([*self.command.split(), *self.argv, *extra])


# ----------------------------------------------------------------------------- loading and checking the recipe

def _lookup(ref: str, scope: dict, where: str, refs: set[str]) -> Any:
    parts = ref.strip().split(".")
    if parts == ["output_dir"]:
        return scope["output_dir"]
    if parts[0] == "steps" and len(parts) == 3 and parts[2] == "output_dir":
        name = parts[1]
        if name in scope["steps"]:
            refs.add(name)
            return scope["steps"][name]
        if name in scope["later"]:
            raise MedGPTError(f"{where}: ${{{ref}}} refers to step '{name}', which does not come before it; a step "
                              f"can only use the outputs of earlier steps. Reorder the steps.")
        near = difflib.get_close_matches(name, list(scope["steps"]), n=1)
        raise MedGPTError(f"{where}: unknown reference ${{{ref}}}: no earlier step is named '{name}' (earlier "
                          f"steps: {', '.join(scope['steps']) or 'none'})."
                          + (f" Did you mean '{near[0]}'?" if near else ""))
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "vars"):
        name = parts[-1]
        if name in scope["vars"]:
            return scope["vars"][name]
        near = difflib.get_close_matches(name, list(scope["vars"]), n=1)
        raise MedGPTError(f"{where}: unknown reference ${{{ref}}}: no var named '{name}' (vars: "
                          f"{', '.join(scope['vars']) or 'none'}). Add it under `vars:` in the recipe."
                          + (f" Did you mean '{near[0]}'?" if near else ""))
    raise MedGPTError(f"{where}: unknown reference ${{{ref}}}. Use ${{NAME}} or ${{vars.NAME}} for a var, "
                      f"${{steps.STEP.output_dir}} for an earlier step's output, or ${{output_dir}}.")


def substitute(value: Any, scope: dict, where: str, refs: set[str] | None = None) -> Any:
    """Fill ${...} references in strings (recursively in lists and dicts). A string that is one whole
    reference takes the referenced value as it is (a list var stays a list)."""
    refs = set() if refs is None else refs
    if isinstance(value, str):
        whole = REF.fullmatch(value.strip())
        if whole:
            return _lookup(whole.group(1), scope, where, refs)
        return REF.sub(lambda m: str(_lookup(m.group(1), scope, where, refs)), value)
    if isinstance(value, list):
        return [substitute(v, scope, where, refs) for v in value]
    if isinstance(value, dict):
        return {substitute(k, scope, where, refs): substitute(v, scope, f"{where}.{k}", refs)
                for k, v in value.items()}
    return value


def _flag_value(value: Any, key: str, where: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    nested = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    if any(isinstance(v, (dict, list, tuple)) for v in nested):  # e.g. pt.phases: passed as JSON flow
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if any("," in str(v) for v in value):  # lists are comma-separated: pass this one as JSON flow instead
            return json.dumps(list(value), ensure_ascii=False)
        return ",".join(str(v) for v in value)
    return str(value)


def _commands() -> str:
    from medgpt.cli import COMMANDS

    return ", ".join(n for n in COMMANDS if n != "pipeline")


def check_step(i: int, raw: Any, scope: dict) -> Step:
    """One recipe step as a Step, its command line parsed by its command's Config: an unknown command, key or
    reference, or a bad value, fails here, before any step runs."""
    import importlib

    from medgpt.cli import resolve

    where = f"recipe step {i + 1}"
    if not isinstance(raw, dict):
        raise MedGPTError(f"{where} is not a mapping: write it as `- name: NAME`, `command: COMMAND` (+ `config`, "
                          f"`args`).")
    command = " ".join(str(raw.get("command") or "").split())
    name = str(raw.get("name") or command.replace(" ", "-"))
    where = f"recipe step '{name}'" if name else where
    unknown = [k for k in raw if k not in STEP_KEYS]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), STEP_KEYS, n=1)
        raise MedGPTError(f"{where}: unknown key '{unknown[0]}'; a step has {', '.join(STEP_KEYS)}."
                          + (f" Did you mean '{near[0]}'?" if near else ""))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MedGPTError(f"{where}: a step name is letters, digits, _ . - (it names the step's output dir).")
    args = raw.get("args") or {}
    if not isinstance(args, dict):
        raise MedGPTError(f"{where}: `args` must be a mapping of keys to values (model.name_or_path: ...).")
    refs: set[str] = set()
    config = substitute(raw.get("config"), scope, f"{where}, config", refs)
    if config is not None and not str(config).endswith((".yaml", ".yml")):
        raise MedGPTError(f"{where}: config {config!r} must be a YAML file (.yaml); put single values in `args`.")
    default_out = str(Path(scope["output_dir"]) / name)

    found = resolve(command.split()) if command else None
    if found is None or found[2] or found[0] == "pipeline":
        raise MedGPTError(f"{where}: unknown command '{command}'. Valid commands: {_commands()}.")
    cmd = found[1]
    cls = getattr(importlib.import_module(cmd.module), cmd.config)
    types_by_key = {k: tp for k, _, tp in iter_fields(cls)}
    mapping = {k for k, tp in types_by_key.items() if getattr(tp, "__origin__", None) is dict}
    flat = flatten(substitute(args, scope, f"{where}, args", refs), mapping)
    argv = [str(config)] if config else []
    for key, value in flat.items():
        argv += [f"--{key}", _flag_value(value, key, where)]
    if "output_dir" in types_by_key and "output_dir" not in flat:
        argv += ["--output_dir", default_out]
    step = Step(i, name, command, argv, {}, Path(default_out), "overwrite" in types_by_key, refs)
    try:
        step.parsed = parse_argv(cls, argv, positional=cmd.positional)  # pure parsing: no file or network access
        check = getattr(importlib.import_module(cmd.module), "check_settings", None)
        if callable(check):  # a command's own cheap checks of its settings (no model, no data read)
            check(step.parsed)
    except MedGPTError as e:
        raise MedGPTError(f"{where} ({step.line()}): {e}") from None
    step.config = _jsonable(to_dict(step.parsed))
    step.out = Path(getattr(step.parsed, "output_dir", "") or default_out)
    return step


def load(cfg: Config) -> tuple[Config, list[Step]]:
    """The recipe (from the config itself, or from --recipe FILE) and every step, checked."""
    if cfg.recipe:
        if len(cfg.recipe) > 1 or cfg.steps:
            raise MedGPTError("give exactly one recipe: `medgpt pipeline RECIPE.yaml [--key value ...]`.")
        path = cfg.recipe[0]
        values = load_yaml(path)
        base = build(Config, values, {k: f"in {path}" for k in values})
        cfg = dataclasses.replace(cfg, steps=base.steps, recipe=[], output_dir=cfg.output_dir or base.output_dir,
                                  vars=cfg.vars or base.vars, goals=cfg.goals or base.goals)
    parse_goals(cfg.goals)
    if not cfg.steps:
        raise MedGPTError("the recipe has no steps. Run `medgpt pipeline RECIPE.yaml`, where the recipe lists "
                          "`steps:` (see docs/pipeline.md).")
    if not cfg.output_dir:
        raise MedGPTError("no output_dir: set `output_dir:` in the recipe or pass --output_dir DIR.")
    scope: dict[str, Any] = {"output_dir": cfg.output_dir, "vars": {}, "steps": {}, "later": set()}
    for k, v in cfg.vars.items():
        scope["vars"][k] = substitute(v, scope, f"vars.{k}")
    names = [str(s.get("name") or " ".join(str(s.get("command") or "").split()).replace(" ", "-"))
             for s in cfg.steps if isinstance(s, dict)]
    steps: list[Step] = []
    for i, raw in enumerate(cfg.steps):
        scope["later"] = set(names[i:])
        step = check_step(i, raw, scope)
        if step.name in scope["steps"]:
            raise MedGPTError(f"recipe step '{step.name}' appears twice; give each step its own `name:`.")
        scope["steps"][step.name] = str(step.out)
        steps.append(step)
    for flag, wanted in (("--from_step", [cfg.from_step] if cfg.from_step else []), ("--only", cfg.only)):
        for w in wanted:
            if w not in scope["steps"]:
                raise MedGPTError(f"{flag} {w}: the recipe has no step named '{w}'. Its steps: "
                                  f"{', '.join(scope['steps'])}.")
    return cfg, steps


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- complete or not

def missing_artifacts(command: str, out: Path) -> list[str]:
    """What a finished run of `command` leaves in `out`, that `out` lacks."""
    needs = [n if isinstance(n, tuple) else (n,) for n in ARTIFACTS.get(command, [])]
    return [" or ".join(n) for n in needs if not any((out / f).is_file() for f in n)]


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): d}


def why_incomplete(step: Step, earlier: tuple[float, str] = (0.0, "")) -> Optional[str]:
    """None when the step is complete; else why it must run. `earlier`: when the most recent of the steps
    before it finished, and its name (a step that finished after this one may have changed its inputs)."""
    marker = _marker(step)
    if not marker:
        return "not run yet" if not step.out.exists() else "no finished run recorded"
    if marker.get("config") != step.config:
        old, new = _leaves(marker.get("config") or {}), _leaves(step.config)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return f"settings changed: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}"
    missing = missing_artifacts(step.command, step.out)
    if missing:
        return f"output incomplete, no {', '.join(missing)}"
    if marker.get("finished_at", 0) < earlier[0]:
        return f"step {earlier[1]} ran after it"
    return None


# ----------------------------------------------------------------------------- running

def run(cfg: Config) -> int:
    """Run a recipe's steps in order, skipping completed ones; write <output_dir>/report.md."""
    cfg, steps = load(cfg)
    out = Path(cfg.output_dir)
    log(f"pipeline: {len(steps)} steps, output in {out}" + (" (dry run)" if cfg.dry_run else ""))
    plan: list[tuple[Step, Optional[str]]] = []  # (step, why it runs) or (step, None): skipped
    forced = ran = None
    latest = (0.0, "")  # once a step runs, every later step runs too (now, or next time after --only)
    for step in steps:
        forced = forced or (step.name == cfg.from_step)
        if cfg.only:
            reason = "--only" if step.name in cfg.only else None
        elif forced:
            reason = "--from_step"
        else:
            reason = why_incomplete(step, latest) or (f"an earlier step ({ran}) runs" if ran else None)
            ran = ran or (step.name if reason else None)
        latest = max(latest, (_marker(step).get("finished_at", 0.0), step.name))
        plan.append((step, reason))
    if cfg.only:  # a chosen step whose input is neither chosen nor complete would fail late: say so now
        chosen = {s.name for s, r in plan if r}
        for step, reason in plan:
            for ref in sorted(step.refs - chosen) if reason else []:
                if why_incomplete(next(s for s in steps if s.name == ref)):
                    raise MedGPTError(f"step '{step.name}' uses the output of step '{ref}', which is not complete "
                                      f"and not in --only. Add it: --only {','.join([ref, *cfg.only])}.")

    for step, reason in plan:
        if reason is None:
            step.status = "skipped" if not (cfg.only and step.name not in cfg.only) else "not selected"
            log(f"skip {step.name} ({'complete' if step.status == 'skipped' else 'not in --only'})")
            if step.status == "skipped":
                step.wall = _marker(step).get("wall_s")
        elif cfg.dry_run:
            log(f"would run {step.name} ({reason}):\n  {step.line(_overwrite(step, out))}")
        else:
            step.status = "running"
            write_report(out, steps, cfg.goals)
            _execute(step, reason, len(steps), out, cfg.isolate, steps, cfg.goals)
        if not cfg.dry_run:
            write_report(out, steps, cfg.goals)
    if not cfg.dry_run:
        log(f"pipeline finished: report in {out / REPORT}")
    return 0


def _marker(step: Step) -> dict:
    try:
        return json.loads((step.out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _overwrite(step: Step, root: Path) -> tuple[str, ...]:
    """--overwrite for a rerun, but only in a dir the pipeline owns: inside output_dir, or one it wrote before."""
    if not step.overwritable or not step.out.is_dir() or not any(step.out.iterdir()):
        return ()
    inside = step.out.resolve().is_relative_to(root.resolve())
    return ("--overwrite",) if inside or (step.out / MARKER).is_file() else ()


def _execute(step: Step, reason: str, total: int, root: Path, isolate: bool, steps: list[Step],
             goals: dict) -> None:
    extra = _overwrite(step, root)
    line = step.line(extra)
    log(f"\n=== step {step.index + 1}/{total}: {step.name} ({reason})\n$ {line}")
    (step.out / MARKER).unlink(missing_ok=True)  # a rerun that fails must not look complete afterwards
    start = time.perf_counter()
    try:
        if isolate:
            import subprocess

            code = subprocess.run([sys.executable, "-m", "medgpt.cli", *step.command.split(), *step.argv,
                                   *extra]).returncode
        else:
            from medgpt.cli import main

            code = main([*step.command.split(), *step.argv, *extra])
    except MedGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # a bug or a crash (out of memory, ...): the traceback is what helps here
        traceback.print_exc()
        code = 1
    finally:
        _free_memory()
    step.wall = round(time.perf_counter() - start, 2)  # as the step's marker keeps it (a rerun reads that)
    missing = missing_artifacts(step.command, step.out) if code == 0 else []
    if code != 0 or missing:
        step.status = "failed"
        write_report(root, steps, goals)
        why = f"exited with code {code}" if code else f"finished, but {step.out} has no {', '.join(missing)}"
        alone = f"\n  {step.line(('--overwrite',) if step.overwritable else ())}"
        raise MedGPTError(
            f"pipeline step '{step.name}' ({step.index + 1} of {total}) {why}; the steps after it did not run. "
            f"Fix the problem reported above, then run the same `medgpt pipeline` command again: completed "
            f"steps are skipped and '{step.name}' starts over (add --only {step.name} to run just this step). "
            f"Report: {root / REPORT}. The step's own command:{alone}")
    step.status = "ran"
    if is_main_process():
        write_json(step.out / MARKER, {"name": step.name, "command": step.command, "argv": step.argv,
                                       "config": step.config, "wall_s": round(step.wall, 2),
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "finished_at": time.time()})
    log(f"=== {step.name} done in {step.wall:.1f} s")


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report.md

def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(root: Path, steps: list[Step], goals: Optional[dict] = None) -> None:
    """<output_dir>/report.md: a table of the steps, the verdict (goals, what improved and what did not, answers
    before and after), then per step its command, key metrics, loss plot and sample answers; summary.json beside
    it. Written atomically, after every step."""
    if not is_main_process():
        return
    counts = {s: sum(st.status == s for st in steps) for s in ("ran", "skipped", "failed")}
    lines = [f"# Pipeline report: {root}", "",
             f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + f" of {len(steps)} steps; {sum(s.wall or 0 for s in steps if s.status in ('ran', 'skipped')):.1f} s "
             f"of step time in all.", "", "| # | step | command | status | time | key metrics |",
             "|---|---|---|---|---|---|"]
    details: list[str] = []
    for s in steps:
        metrics = {}
        if s.status in ("ran", "skipped"):
            try:
                metrics = json.loads((s.out / "metrics.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
        key = {k: v for k, v in metrics.items() if any(m in k for m in KEY_METRICS)}
        wall = f"{s.wall:.1f} s" if isinstance(s.wall, (int, float)) else ""
        brief = ", ".join(f"{k} {_fmt(v)}" for k, v in list(key.items())[:4])
        lines.append(f"| {s.index + 1} | {s.name} | {s.command} | {s.status} | {wall} | {brief} |")
        details += ["", f"## {s.index + 1}. {s.name}: {s.status}" + (f" ({wall})" if wall else ""), "",
                    "```", s.line(), "```"]
        if key:
            details += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in key.items()]
        if s.status in ("ran", "skipped") and (s.out / "loss.png").is_file():
            rel = Path(_relpath(s.out / "loss.png", root)).as_posix()
            details += ["", f"![{s.name} loss]({rel})"]
        if s.command == "sample" and s.status in ("ran", "skipped"):
            for row in _read_jsonl(s.out / "samples.jsonl"):
                answer = row.get("answer", "").replace("\n", "\n> ")
                details += ["", f"**Q:** {row.get('question', '')}", "", f"> {answer or '(empty)'}"]
                if "reference" in row:
                    ref = " ".join(row["reference"].split())  # one line: a list in the reference stays in the quote
                    ref = ref if len(ref) <= 300 else ref[:300] + " ..."
                    details += ["", f"Reference (ROUGE-L {row['rouge_l']:.2f}): {ref}"]
    summary = summary_json(steps, goals)
    verdict = verdict_lines(summary) + answers_before_after(steps, root)
    with atomic_write(root / REPORT) as f:
        f.write("\n".join(lines + verdict + evaluation_table(steps) + details) + "\n")
    write_json(root / SUMMARY, summary)


# The before/after figures of a recipe with eval steps, under fixed names other checks read: the first eval step
# is "before", the last "after".
SUMMARY_KEYS = {"heldout_ppl": "answer_ppl/overall", "unsafe_rate": "safety/unsafe_rate",
                "over_refusal": "safety/over_refusal_rate", "mcq_accuracy": "mcq/overall/accuracy",
                "rouge_l": "rouge_l/overall"}


def summary_json(steps: list[Step], goals: Optional[dict] = None) -> dict:
    """<output_dir>/summary.json: what was fine-tuned, each step's status and seconds, the first and the last eval
    step's headline numbers as NAME_before / NAME_after, the knowledge-base figures of the last eval, and each
    recipe goal checked (goals, goals_met: None until both evals have run)."""
    def metrics(s: Step) -> dict:
        try:
            return json.loads((s.out / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    trained = next((s for s in steps if s.command not in ("eval", "sample", "merge") and s.parsed is not None
                    and getattr(getattr(s.parsed, "model", None), "name_or_path", None)), None)
    out: dict[str, Any] = {"model": trained.parsed.model.name_or_path if trained else None,
                           "seconds": round(sum(s.wall or 0 for s in steps if s.status in ("ran", "skipped")), 1),
                           "steps": {s.name: {"command": s.command,
                                              "status": "complete" if s.status in ("ran", "skipped") else s.status,
                                              "seconds": round(s.wall, 1) if s.wall is not None else None}
                                     for s in steps}}
    evals = [metrics(s) for s in steps if s.command == "eval" and s.status in ("ran", "skipped")]
    out["evals"] = len(evals)
    if evals:
        for name, key in SUMMARY_KEYS.items():
            out[f"{name}_before"], out[f"{name}_after"] = evals[0].get(key), evals[-1].get(key)
        for key in ("hit_rate", "hit_at_1", "cited_right_rate"):
            out[f"rag_{key}"] = evals[-1].get(f"rag/{key}")
    if goals:
        out["goals"] = check_goals(goals, out if len(evals) > 1 else {})
        met = [g["met"] for g in out["goals"]]
        out["goals_met"] = None if None in met else all(met)
    return out


LOWER_IS_BETTER = {"heldout_ppl", "unsafe_rate", "over_refusal"}
GOAL = re.compile(r"(?P<sign>[+-])(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>%|pt)|(?P<op><=|>=)\s*(?P<bound>\d+(?:\.\d+)?)")


def parse_goals(goals: dict) -> dict[str, re.Match]:
    """Each recipe goal's SPEC parsed; an unknown figure or a SPEC that does not parse fails before anything runs."""
    parsed = {}
    for name, spec in goals.items():
        if name not in SUMMARY_KEYS:
            near = difflib.get_close_matches(str(name), list(SUMMARY_KEYS), n=1)
            raise MedGPTError(f"recipe goal '{name}': not a summary figure; goals can name {', '.join(SUMMARY_KEYS)}."
                              + (f" Did you mean '{near[0]}'?" if near else ""))
        m = GOAL.fullmatch(str(spec).strip())
        if m is None:
            raise MedGPTError(f"recipe goal '{name}: {spec}': write a change from the first eval to the last, "
                              f"'-10%' (relative) or '-25pt' (points of a rate), or a bound on the last, '<= 0.1'.")
        parsed[name] = m
    return parsed


def check_goals(goals: dict, summary: dict) -> list[dict]:
    """Each goal with its figures before and after and whether it is met (None while a figure is missing)."""
    rows = []
    for name, m in parse_goals(goals).items():
        before, after = summary.get(f"{name}_before"), summary.get(f"{name}_after")
        if m["op"]:
            bound = float(m["bound"])
            met = None if after is None else (after <= bound if m["op"] == "<=" else after >= bound)
        elif before is None or after is None:
            met = None
        else:
            delta = float(m["num"]) / 100 * (before if m["unit"] == "%" else 1)  # 10% of before, or 25 points
            met = after <= before - delta if m["sign"] == "-" else after >= before + delta
        rows.append({"goal": name, "want": str(goals[name]).strip(), "before": before, "after": after, "met": met})
    return rows


def _change(name: str, before: float, after: float) -> str:
    """A change as a reader weighs it: relative for perplexity, points for rates and scores."""
    if name == "heldout_ppl":
        return f"{after / before - 1:+.1%}" if before else f"{after - before:+.3g}"
    return f"{100 * (after - before):+.1f} pt"


def _figure(name: str, v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if name == "heldout_ppl" else f"{100 * v:.1f}%" if name != "rouge_l" else f"{v:.3f}"


def verdict_lines(summary: dict) -> list[str]:
    """## Verdict: the recipe's goals met or not, then every before/after figure sorted into improved, worse and
    unchanged, in plain words. Empty until two eval steps have run."""
    pairs = [(n, summary.get(f"{n}_before"), summary.get(f"{n}_after")) for n in SUMMARY_KEYS]
    pairs = [(n, b, a) for n, b, a in pairs if b is not None and a is not None]
    if not pairs or summary.get("evals", 0) < 2:
        return []
    out = ["", "## Verdict", ""]
    if summary.get("goals"):
        met = summary.get("goals_met")
        out += [f"Goals: {'all met' if met else 'not all met' if met is False else 'not yet measured'}.", "",
                "| goal | wanted | before | after | change | met |", "|---|---|---:|---:|---:|---|"]
        for g in summary["goals"]:
            change = _change(g["goal"], g["before"], g["after"]) if None not in (g["before"], g["after"]) else ""
            out.append(f"| {g['goal']} | {g['want']} | {_figure(g['goal'], g['before'])} | "
                       f"{_figure(g['goal'], g['after'])} | {change} | "
                       f"{'yes' if g['met'] else 'no' if g['met'] is False else 'n/a'} |")
        out.append("")
    better, worse, same = [], [], []
    for name, before, after in pairs:
        text = f"{name} {_figure(name, before)} -> {_figure(name, after)} ({_change(name, before, after)})"
        if abs(after - before) < 1e-9:
            same.append(text)
        elif (after < before) == (name in LOWER_IS_BETTER):
            better.append(text)
        else:
            worse.append(text)
    for label, items in (("Improved", better), ("Worse", worse), ("Unchanged", same)):
        out.append(f"- **{label}:** {'; '.join(items) if items else 'nothing'}.")
    if summary.get("rag_hit_rate") is not None:
        out.append(f"- **Knowledge base (last eval):** retrieval hit rate {_figure('rate', summary['rag_hit_rate'])}"
                   f", best passage from the right leaflet {_figure('rate', summary.get('rag_hit_at_1'))}, answers "
                   f"citing the right leaflet {_figure('rate', summary.get('rag_cited_right_rate'))}.")
    return out


def _quote(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return "> " + ((text if len(text) <= limit else text[:limit] + " ...") or "(empty)")


def answers_before_after(steps: list[Step], root: Path, n: int = 3) -> list[str]:
    """The first `n` held-out questions of the first and the last eval, answered before and after (the same
    questions every run: the first of the file, not picked), and the first knowledge-base questions answered with
    the passages (and without, when the eval wrote that too)."""
    evals = [s for s in steps if s.command == "eval" and s.status in ("ran", "skipped")]
    if len(evals) < 2:
        return []
    first, last = evals[0], evals[-1]
    out: list[str] = []
    for path in sorted((first.out / "predictions").glob("qa-*.jsonl")):
        before, after = _read_jsonl(path), _read_jsonl(last.out / "predictions" / path.name)
        rows = [(b, a) for b, a in zip(before, after) if b.get("prompt") == a.get("prompt")][:n]
        if rows:
            out += ["", f"## Held-out answers, {first.name} vs {last.name} ({path.stem[3:]})"]
        for b, a in rows:
            out += ["", f"**Q:** {b['prompt']}", "", f"Before (ROUGE-L {b.get('rouge_l', 0):.2f}):", "",
                    _quote(b.get("answer", "")), "", f"After (ROUGE-L {a.get('rouge_l', 0):.2f}):", "",
                    _quote(a.get("answer", "")), "", "Reference:", "", _quote(b.get("reference", ""), 300)]
    for path in sorted((last.out / "predictions").glob("rag-*.jsonl")):
        rows = _read_jsonl(path)[:2]
        if rows:
            out += ["", f"## Knowledge-base answers, {last.name} ({path.stem[4:]})"]
        for r in rows:
            cited = ", ".join(r.get("cited") or []) or "none"
            out += ["", f"**Q:** {r.get('question', '')} (answer in {r.get('source', '?')}; retrieved: "
                    f"{', '.join(r.get('retrieved') or [])}; cited: {cited})", "", "With the knowledge base:", "",
                    _quote(r.get("answer", ""))]
            if "answer_without_rag" in r:
                out += ["", "Without:", "", _quote(r["answer_without_rag"])]
    return out


def evaluation_table(steps: list[Step]) -> list[str]:
    """Every finished `eval` step side by side (before/after a stage: same files, other model), with the change
    from the first to the last; empty without eval steps."""
    evals = [s for s in steps if s.command == "eval" and s.status in ("ran", "skipped")]
    if not evals:
        return []
    from medgpt.eval.command import summary

    columns = []
    for s in evals:
        try:
            columns.append(summary(json.loads((s.out / "metrics.json").read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            columns.append({})
    keys = list(dict.fromkeys(k for c in columns for k in c))
    delta = len(evals) > 1
    head = ["metric", *(s.name for s in evals)] + ([f"change ({evals[0].name} -> {evals[-1].name})"] if delta else [])
    out = ["", "## Evaluation", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        row = [k] + [_fmt(c[k]) if k in c else "" for c in columns]
        if delta:
            first, last = columns[0].get(k), columns[-1].get(k)
            row.append(f"{last - first:+.4g}" if first is not None and last is not None else "")
        out.append("| " + " | ".join(row) + " |")
    return out


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
