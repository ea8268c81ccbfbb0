"""The `smile` command line: parses arguments and calls the library. Heavy imports stay inside commands,
so `--help` and argument errors answer at once.

Exit codes: 0 success; 2 bad arguments or bad inputs; 1 any other failure; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import typer

from smile_cli import defaults

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_exceptions
# typer 0.29 keeps Exit and Abort in typer.exceptions (its click copy lacks them); older ones re-export click's
ExitException = getattr(click_exceptions, "Exit", typer.Exit)
AbortException = getattr(click_exceptions, "Abort", getattr(typer, "Abort", KeyboardInterrupt))

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES_HELP = "Exit codes: 0 success; 2 bad arguments or bad inputs; 1 any other failure; 130 interrupted."

app = typer.Typer(
    name="smile",
    help="Build a Sparse Mixture of Low-rank Experts (SMILE) from a base model and its fine-tunes. " + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default]" and "[@revision]" are text, not rich markup
)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def setup_logging(quiet: bool) -> None:
    """Warnings and info on stderr ('warning: ...' lines; rich formatting on a terminal); errors only with --quiet."""
    logger = logging.getLogger("smile")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")
    logging.addLevelName(logging.ERROR, "error")
    logger.addHandler(handler)


class RichProgress:
    """A progress bar on stderr, for terminals."""

    def __init__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=_stderr_console(),
            transient=True,
        )
        self.task = None

    def start(self, total: int, description: str) -> None:
        self.bar.start()
        self.task = self.bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        self.bar.advance(self.task, amount)

    def stop(self) -> None:
        self.bar.stop()


class LineProgress:
    """Plain progress lines on stderr at every 10%, for logs and pipes."""

    def __init__(self):
        self.total, self.done, self.next_mark, self.started = 1, 0, 10, time.perf_counter()

    def start(self, total: int, description: str) -> None:
        self.total, self.description, self.started = max(total, 1), description, time.perf_counter()

    def advance(self, amount: int) -> None:
        self.done += amount
        percent = 100 * self.done // self.total
        if percent >= self.next_mark:
            elapsed = time.perf_counter() - self.started
            print(
                f"{self.description}: {percent}% ({self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB, {elapsed:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            self.next_mark = percent - percent % 10 + 10

    def stop(self) -> None:
        pass


def _progress(quiet: bool):
    if quiet:
        return None
    return RichProgress() if sys.stderr.isatty() else LineProgress()


def _version(value: bool) -> None:
    if value:
        from smile_cli import __version__

        print(f"smile {__version__}")
        raise typer.Exit()


# Options that several commands share, declared once (upscale's and inspect's defaults: defaults.py, applied by
# options.UpscaleOptions).
_EXPERTS = typer.Option(
    None,
    "--experts",
    help="Fine-tuned models or PEFT LoRA adapters (folders or Hub ids), comma-separated (repeatable).",
)
_ROUTER_RANK = typer.Option(
    None,
    "--router-rank",
    help="Right singular vectors per expert for routing (the paper's gate_k); upscale also takes 'auto' (per "
    f"module) [{defaults.ROUTER_RANK}].",
)
_EXPERT_RANK = typer.Option(
    None,
    "--expert-rank",
    help="Rank of each expert, or 'full' for dense experts; upscale also takes 'auto' (needs --budget) "
    f"[{defaults.EXPERT_RANK}].",
)
_BUDGET = typer.Option(
    None,
    "--budget",
    help="Total parameters of the output, e.g. 1.2x (the base's) or 7.5B. upscale, with --expert-rank auto: ranks "
    "go per module and expert where the updates' singular values hold the most energy; inspect: the ranks that fit.",
)
_SVD = typer.Option(
    None,
    "--svd",
    help="Factorization: exact|randomized|auto [auto = randomized where the rank and not the matrix is small; "
    "auto and randomized give the same bytes on any thread count, exact may not].",
)
_DEVICE = typer.Option(None, "--device", help=f"Where to factorize: auto|cpu|cuda[:N] [{defaults.DEVICE}].")
_TARGET = typer.Option(
    None,
    "--target",
    help="Modules to upscale: comma-separated globs on module names, e.g. '*.q_proj,*.v_proj' or 'mlp.*' "
    "(default: every nn.Linear but the output head; for decoder LLMs the 7 projections).",
)
_CONFIG = typer.Option(None, "--config", help="YAML file with any of these options; flags override it.")
_ALLOW_PICKLE = typer.Option(
    False, "--allow-pickle", help="Read pytorch_model.bin inputs (weights-only unpickler; never arbitrary code)."
)
_TRUST_REMOTE_CODE = typer.Option(
    False,
    "--trust-remote-code",
    help="Accept inputs with custom model or tokenizer code (auto_map); it is never run, nor copied into an output.",
)
_QUIET = typer.Option(False, "--quiet", "-q", help="Errors only on stderr (no progress, no warnings).")
_JSON = typer.Option(False, "--json", help="One JSON document (the summary or report) on stdout; logs stay on stderr.")


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """Build a Sparse Mixture of Low-rank Experts (SMILE) from a base model and its fine-tunes."""


@app.command(epilog=EXIT_CODES_HELP)
def upscale(
    base: str = typer.Option(None, "--base", help="Base model: a local folder or a Hub id org/name[@revision]."),
    experts: list[str] = _EXPERTS,
    out: Path = typer.Option(None, "--out", help="Output folder (created; must not exist or be empty)."),
    router_rank: str = _ROUTER_RANK,
    expert_rank: str = _EXPERT_RANK,
    budget: str = _BUDGET,
    top_k: int = typer.Option(None, "--top-k", help=f"Experts added per token [{defaults.TOP_K}]."),
    routing: str = typer.Option(
        None,
        "--routing",
        help="How tokens pick experts: auto (likelihood-prompt for a decoder-only LM, served by vLLM as faithful; "
        "faithful for other architectures; calibrated with --calibrate), likelihood-prompt (one expert per prompt, "
        "the one the model is most confident under; T extra prefills; decoder-only LMs), faithful (the paper's "
        "per-token router), prompt-model (one expert mix per prompt), spectral-prompt, combined-prompt "
        "(README, Routing; docs/results/routing_modes.md) "
        f"[{defaults.ROUTING}].",
    ),
    routing_temperature: float = typer.Option(
        None,
        "--routing-temperature",
        help=f"Softmax temperature of a routing variant's scores [{defaults.ROUTING_TEMPERATURE}].",
    ),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype: auto|bfloat16|float16|float32 [auto = base's]."),
    tokenizer: str = typer.Option(
        None,
        "--tokenizer",
        help="The output's tokenizer: base, union (the base's plus every token the experts add, with their "
        "embedding rows), or N (the N-th expert's, from 1) [base].",
    ),
    chat_template: str = typer.Option(
        None,
        "--chat-template",
        help="The output's chat template: auto (the base's, else the one the experts share), base, N (the N-th "
        "expert's) or a template FILE [auto].",
    ),
    allow_vocab_mismatch: bool = typer.Option(
        False, "--allow-vocab-mismatch", help="Accept experts whose vocabulary is not the base's or an extension."
    ),
    max_shard_size: str = typer.Option(
        None,
        "--max-shard-size",
        help=f"Largest output file: bytes or 500MB, 5GB [{defaults.MAX_SHARD_SIZE // 10**9}GB].",
    ),
    svd: str = _SVD,
    device: str = _DEVICE,
    target: str = _TARGET,
    shard: str = typer.Option(
        None, "--shard", help="Write only part i/N of the output (job arrays); then run `smile assemble OUT`."
    ),
    inputs: str = typer.Option(
        None,
        "--inputs",
        help="How Hub inputs are read: stream (range requests, no copy on disk), download (into the HF cache "
        "first), or auto (cached files from the cache, the rest streamed) [auto].",
    ),
    config: Path = _CONFIG,
    calibrate: str = typer.Option(
        None,
        "--calibrate",
        help="YAML file of 1-8 example prompts per expert (by --experts ref or index from 0): routers fitted to the "
        "base's inputs of every upscaled linear, stored in the output; --routing auto then routes with them "
        "(calibrated: per token, as faithful) (README, Calibrated routing).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (tensors, size, parameters, memory); write nothing."
    ),
    seed: int = typer.Option(
        None, "--seed", help=f"Seed of every random choice (recorded in the options) [{defaults.SEED}]."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an existing output folder of smile's (one with its smile_manifest.json, or an empty one) and "
        "discard an interrupted run's staging; any other folder is refused.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run or part: keep its verified shards, compute the rest."
    ),
    allow_pickle: bool = _ALLOW_PICKLE,
    trust_remote_code: bool = _TRUST_REMOTE_CODE,
    quiet: bool = _QUIET,
    json_output: bool = _JSON,
):
    """Upscale a base model and its fine-tunes into one SMILE model folder."""
    flags = dict(locals())  # first: every parameter, by name (an option's flag is named as its field)
    from smile_cli.options import UpscaleOptions, load_options

    setup_logging(quiet)
    overrides = {name: flags.get(name) for name in UpscaleOptions.model_fields}  # None: not given on the line
    overrides["allow_vocab_mismatch"] = allow_vocab_mismatch or None  # a switch: unset unless given
    options = load_options(config, overrides)
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if dry_run:
        from smile_cli.inputs.hub_session import inputs_summary
        from smile_cli.planning import load_plan
        from smile_cli.render import format_plan

        plan = load_plan(options, **policy)
        summary = {**plan.summary(), **inputs_summary(plan)}
        _print_result(summary, json_output, format_plan)
        return
    if out is None:
        from smile_cli.errors import InputError

        raise InputError("--out is required (or use --dry-run)")
    from smile_cli.upscale import upscale as run_upscale

    part = _parse_part(shard)
    with _sigterm_as_interrupt():
        summary = run_upscale(options, out, force=force, resume=resume, progress=_progress(quiet), part=part, **policy)
    if "part" in summary and summary.get("rank") != 0:
        _print_result(summary, json_output, lambda s: f"wrote part {s['part']} of {s['out']}")
        return
    if not quiet and not json_output:
        print(
            f"wrote {summary['out']}: {len(summary['files'])} file(s), {summary['output_bytes'] / 1e9:.3f} GB, "
            f"{summary['params'] / 1e6:,.2f}M params ({summary['params_ratio']}x base) in {summary['seconds']:.1f} s",
            file=sys.stderr,
        )
    _print_result(summary, json_output, lambda s: s["out"])


@app.command(epilog="Exit codes: 0 sound; 1 defects found (each on one line); 2 bad arguments.")
def verify(
    model_dir: Path = typer.Argument(..., help="An output folder of smile upscale."),
    no_load: bool = typer.Option(False, "--no-load", help="Skip the forward passes (per module and whole model)."),
    max_memory: str = typer.Option(
        None,
        "--max-memory",
        help="Run the whole-model forward pass only when loading the model fits this (e.g. 8GB) "
        "[half the available memory]; every SmileLinear is checked on its own in fixed memory regardless.",
    ),
    json_output: bool = _JSON,
):
    """Check an output folder: files, headers, checksums, config, modeling code, values, and forward passes."""
    from smile_cli.verify import verify_folder

    _quiet_transformers()
    budget = None if max_memory is None else _size("--max-memory", max_memory)
    report = verify_folder(model_dir, load=not no_load, max_memory=budget)
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        if report["ok"]:
            print(f"{model_dir}: sound ({len(report['checks'])} checks passed)")
        for name in report["checks"]:
            how = report["how"].get(name)
            print(f"  checked {name}" + (f": {how}" if how else ""))
        for skipped in report["skipped"]:
            print(f"  skipped {skipped}")
        for defect in report["defects"]:
            print(f"defect: {defect}", file=sys.stderr)
    if not report["ok"]:
        raise typer.Exit(EXIT_FAILURE)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, a scheduler's stop) is handled like Ctrl-C: the run stops and stays resumable."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _size(flag: str, value: str) -> int:
    """Bytes of a size flag's value (500MB, 5GB, a number); a bad value is an InputError naming the flag."""
    from smile_cli.options import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        from smile_cli.errors import InputError

        raise InputError(f"{flag}: {e}") from None


def _parse_part(shard: str | None) -> tuple[int, int] | None:
    """--shard i/N -> (i, N), with 0 <= i < N."""
    if shard is None:
        return None
    from smile_cli.errors import InputError

    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise InputError(f"--shard {shard!r}: expected i/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {shard!r}: i must be between 0 and N-1")
    return index, count


@app.command(epilog=EXIT_CODES_HELP)
def assemble(
    out: Path = typer.Argument(..., help="The --out folder of the `smile upscale --shard i/N` runs."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output folder of smile's (or an empty one); others are refused."
    ),
    allow_pickle: bool = _ALLOW_PICKLE,
    trust_remote_code: bool = _TRUST_REMOTE_CODE,
    quiet: bool = _QUIET,
    json_output: bool = _JSON,
):
    """Finish an upscale done in parts (--shard i/N): check the parts, write index and metadata, move into place."""
    from smile_cli.runs import assemble as run_assemble

    setup_logging(quiet)
    summary = run_assemble(out, force=force, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    _print_result(summary, json_output, lambda s: s["out"])


@app.command(epilog=EXIT_CODES_HELP)
def inspect(
    base: str = typer.Argument(None, help="Base model: a local folder or a Hub id org/name[@revision]."),
    experts: list[str] = _EXPERTS,
    router_rank: str = _ROUTER_RANK,
    expert_rank: str = _EXPERT_RANK,
    budget: str = _BUDGET,
    spectrum_rank: int = typer.Option(
        defaults.SPECTRUM_RANK, "--spectrum-rank", help="Singular values computed at least, per update."
    ),
    svd: str = _SVD,
    device: str = _DEVICE,
    target: str = _TARGET,
    config: Path = _CONFIG,
    plot: Path = typer.Option(None, "--plot", help="Write PNG figures into this folder (needs matplotlib)."),
    allow_pickle: bool = _ALLOW_PICKLE,
    trust_remote_code: bool = _TRUST_REMOTE_CODE,
    quiet: bool = _QUIET,
    json_output: bool = _JSON,
):
    """Spectra, subspace overlaps, parameter counts and budget ranks of the task updates; writes no model."""
    from smile_cli.inspection import inspect as run_inspect
    from smile_cli.inspection import write_plots
    from smile_cli.options import load_options
    from smile_cli.render import render_inspection

    setup_logging(quiet)
    overrides = dict(base=base, experts=experts, router_rank=router_rank, expert_rank=expert_rank)
    options = load_options(config, dict(overrides, svd=svd, device=device, target=target))
    policy = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    report = run_inspect(options, budget=budget, spectrum_rank=spectrum_rank, **policy)
    if plot is not None:
        report["plots"] = write_plots(report, plot)
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        render_inspection(report, Console())


@app.command(name="export", epilog=EXIT_CODES_HELP)
def export_command(
    model_dir: Path = typer.Argument(..., help="A SMILE model folder written by smile upscale."),
    out: Path = typer.Argument(..., help="Output folder (created; must not exist or be empty)."),
    expert: int = typer.Option(..., "--expert", help="Index of the expert to export (0-based, as in the model card)."),
    kind: str = typer.Option("lora", "--as", help="lora: a PEFT LoRA adapter of the base; dense: a plain model."),
    max_shard_size: str = typer.Option(
        str(defaults.MAX_SHARD_SIZE), "--max-shard-size", help="Largest output file (dense): bytes or 500MB, 5GB."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output folder of smile's (or an empty one); others are refused."
    ),
    quiet: bool = _QUIET,
    json_output: bool = _JSON,
):
    """Write one expert of a SMILE model as a PEFT LoRA adapter or as a dense model of the base architecture."""
    from smile_cli.export import export

    setup_logging(quiet)
    summary = export(
        model_dir, expert, kind, out, force=force, max_shard_size=_size("--max-shard-size", max_shard_size)
    )
    _print_result(summary, json_output, lambda s: s["out"])


@app.command(name="route", epilog=EXIT_CODES_HELP)
def route_command(
    model_dir: Path = typer.Argument(..., help="A SMILE model folder written by smile upscale."),
    prompt: list[str] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help="A text file, one prompt per line."),
    image: list[Path] = typer.Option(
        None, "--image", help="An image file (repeatable), for a model that reads pixel_values (CLIP's vision tower)."
    ),
    plot_file: Path = typer.Option(None, "--plot", help="Write a heatmap (layers x tokens, coloured by expert) PNG."),
    json_output: bool = typer.Option(
        False, "--json", help="Every token's (or image position's) expert and weight per layer, as JSON."
    ),
):
    """Show which expert every upscaled layer picks for each token of a prompt (or each patch of an image)."""
    from smile_cli.errors import InputError
    from smile_cli.route import plot, route, routed_inputs

    _quiet_transformers()
    prompts = list(prompt or [])
    if prompts_file is not None:
        try:
            prompts += [line for line in prompts_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise InputError(f"{prompts_file}: cannot read: {e.strerror or e}") from e
    report = route(model_dir, prompts, list(image or []))
    if plot_file is not None:
        plot(report, plot_file)
    if json_output:
        print(json.dumps(report, indent=2))
        return
    from smile_cli.render import print_routing

    print_routing(routed_inputs(report), report["experts"])


@app.command(name="serve", epilog=EXIT_CODES_HELP)
def serve_command(
    model_dir: Path = typer.Argument(..., help="A SMILE model folder written by smile upscale."),
    extra: list[str] = typer.Argument(None, help="After --: more flags for vLLM's server (e.g. --max-model-len 2048)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the server listens on."),
    port: int = typer.Option(8000, "--port", help="Port the server listens on."),
    routing: str = typer.Option(
        None, "--routing", help="faithful: serve a folder built with a prompt routing mode with the per-token router."
    ),
    python: str = typer.Option(
        None, "--python", help="The vLLM venv's python (default: $SMILE_VLLM_PYTHON, else smile_cli.vllm_env's venv)."
    ),
):
    """Serve a SMILE folder with vLLM's OpenAI-compatible server (in the vLLM venv: python -m smile_cli.vllm_env)."""
    from smile_cli.serve import serve

    serve(model_dir, host=host, port=port, routing=routing, python=python, extra=list(extra or []))


def _quiet_transformers() -> None:
    """transformers' own warnings and progress bars are not smile's output (commands that load a model)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _print_result(summary: dict, json_output: bool, formatter) -> None:
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(formatter(summary))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this; the console script exits with it)."""
    command = typer.main.get_command(app)
    try:
        # without standalone mode, click returns the code of a typer.Exit instead of raising it
        code = command.main(args=argv, prog_name="smile", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except ExitException as e:
        return e.exit_code
    except click_exceptions.ClickException as e:
        e.show(file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, AbortException):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        from smile_cli.errors import SmileError

        if os.environ.get("SMILE_DEBUG"):
            raise
        if isinstance(e, SmileError):
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        print(
            f"error: unexpected failure: {type(e).__name__}: {e} (set SMILE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def main() -> None:
    sys.exit(run())
