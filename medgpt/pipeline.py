"""Run a recipe of medgpt commands, each step's output feeding the next; re-running skips completed steps.

    medgpt pipeline configs/pipeline/qwen2.5-0.5b-lora.yaml
    medgpt pipeline configs/pipeline/qwen2.5-0.5b-lora.yaml --from_step dpo      # or --from dpo
    medgpt pipeline configs/pipeline/qwen2.5-0.5b-lora.yaml --dry_run --output_dir outputs/try

The recipe is this command's config file (format: docs/pipeline.md): `output_dir`, `vars` and `steps`, each
step a medgpt command with an optional config YAML and `--key value` args, `${var}` and
`${steps.NAME.output_dir}` filled in. Recipe: load -> check every step (command, keys, types, references) by
parsing its command line with the command's own Config, before anything runs -> for each step: skip it when
complete, else run it in this process (`medgpt.cli.main`) -> record it -> report.md (medgpt/report.py).

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
from medgpt.report import REPORT, parse_goals, write_report
from medgpt.utils import MedGPTError, is_main_process, log, write_json

MARKER = "pipeline_step.json"  # in a step's dir after it succeeded: its argv, resolved config, wall time
STEP_KEYS = ("name", "command", "config", "args")
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# What a finished run leaves in its dir (a tuple: any one of them). Other commands: the marker alone counts.
ARTIFACTS: dict[str, list] = {
    **{c: ["metrics.json", "config.yaml", WEIGHTS] for c in ("pt", "sft", "rm", "dpo", "orpo", "simpo", "kto",
                                                             "grpo", "rloo", "ppo")},
    "tokenizer train": ["tokenizer.json"], "tokenizer extend": ["tokenizer.json"], "pack": ["meta.json"],
    "merge": ["config.json", WEIGHTS], "sample": ["samples.jsonl"], "eval": ["metrics.json", "report.md"],
}
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
