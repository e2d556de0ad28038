"""The `adakd` command line: entry points only; the work lives in pipeline/, trainer/ and storage/."""

from __future__ import annotations

import os
import sys

import click

from adakd import storage

# transformers' "Loading weights" bars on every model load are noise in a command's output (our own bars stay)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
LOSSES = ["fkl", "rkl", "jsd", "sfkl", "srkl", "tvd", "akl", "abkd"]  # trainer.losses.DIVERGENCES, without importing torch
ROW_TOKENS = 1024  # common.packing.DEFAULT_ROW_TOKENS, without importing torch
INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


class _Command(click.Command):
    """A command whose error message passes `storage.redact`: a store URI's credentials never reach a terminal."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            e.message = storage.redact(e.message)
            raise


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="adakd")
def main() -> None:
    """Offline knowledge distillation: cache a teacher once, train students with AdaKD from the cache."""


@main.command("cache-teacher", cls=_Command, context_settings=CONTEXT, short_help="Stage one: cache a teacher's sparse targets.", epilog="""\b
Example (the tiny real teacher shipped in ../shared, on TinyStories):
  cache-teacher --teacher ../shared/models/stories260K --data ../shared/data/tinystories/train.jsonl \\
      --out runs/stories-train --top-k 64 --engine hf
Unbiased sampled targets (64 draws per position), or a top-8 head plus 32 draws from the tail:
  cache-teacher ... --targets sampled --samples 64
  cache-teacher ... --targets hybrid --top-k 8 --samples 32
Guide: docs/cache-teacher.md""")
@click.option("--teacher", required=True, help="Teacher model: a local Hugging Face directory or a hub name available offline.")
@click.option("--data", "data", required=True, help="Dataset: local .jsonl/.json/.parquet/.csv/.txt file(s), directory or glob, one such file on a store (s3://bucket/gen.jsonl), or a datasets hub name.")
@click.option("--out", required=True, help="Cache directory (local path or pyarrow URI such as s3://bucket/cache).")
@click.option("--top-k", "k", type=int, default=None, help="Teacher log-probabilities kept per position: the exact head [default: 64 for topk, 8 for hybrid; sampled has none].")
@click.option("--targets", type=click.Choice(["topk", "sampled", "hybrid"]), default="topk", show_default=True, help="topk: the k most likely ids + the tail mass; sampled: N draws from the teacher (distinct ids, counts, log-probs), unbiased; hybrid: the top-k head + N draws from the tail.")
@click.option("--samples", type=int, default=64, show_default=True, help="Draws per trained position (sampled, hybrid).")
@click.option("--sample-temperature", type=float, default=1.0, show_default=True, help="Proposal the draws come from: softmax(logits / T); 1 is the teacher itself (sampled, hybrid).")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed of the draws; each sequence's draws depend only on it and the record (sampled, hybrid).")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True, help="auto: vLLM when installed, else transformers.")
@click.option("--tokenizer", default=None, help="Tokenizer, if not the teacher's directory.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--max-length", type=int, default=None, help="Maximum tokens per sequence [default: the teacher's positions - 1].")
@click.option("--length-policy", type=click.Choice(["truncate", "skip"]), default="truncate", show_default=True, help="What to do with longer sequences.")
@click.option("--split", default="train", show_default=True, help="Split, for hub datasets.")
@click.option("--data-config", default=None, help="Configuration name, for hub datasets.")
@click.option("--shape", type=click.Choice(["auto", "instruction", "chat", "text"]), default="auto", show_default=True, help="Record shape.")
@click.option("--prompt-field", default=None, help="Column with a pre-rendered prompt [default: prompt, if present].")
@click.option("--instruction-field", default=None, help="Instruction column [default: instruction/question].")
@click.option("--input-field", default=None, help="Optional context column [default: input/context].")
@click.option("--response-field", default=None, help="Response column [default: output/response/completion/answer].")
@click.option("--messages-field", default=None, help="Chat messages column [default: messages/conversations].")
@click.option("--text-field", default=None, help="Plain-text column [default: text/content].")
@click.option("--prompt-template", default=None, help="Template with {instruction} and {input} [default: MiniLLM's].")
@click.option("--limit", type=int, default=None, help="Use only the first N records.")
@click.option("--num-workers", type=int, default=1, show_default=True, envvar="ADAKD_NUM_WORKERS", help="Processes writing this cache (one per GPU / node).")
@click.option("--worker-index", type=int, default=0, show_default=True, envvar="ADAKD_WORKER_INDEX", help="This process's index in 0..num-workers-1.")
@click.option("--batch-tokens", type=int, default=None, help="Tokens per engine call (hf: rows x row length, padding included) [default: hf 8192, vllm 65536].")
@click.option("--packing/--no-packing", default=True, show_default=True, help="hf engine: several whole sequences per row, attention confined to each; --no-packing: one sequence per row, right-padded. A teacher whose forward cannot take packed rows exactly gets padded rows, with a note.")
@click.option("--row-tokens", type=int, default=ROW_TOKENS, show_default=True, help="hf engine: packed row length.")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vLLM tensor parallelism for teachers that do not fit one GPU.")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True, help="vLLM GPU memory share.")
@click.option("--shard-positions", type=int, default=65536, show_default=True, help="Trained positions per shard.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model/tokenizer code from the model directory (off by default).")
@click.option("--vllm-stock-path", is_flag=True, hidden=True, help="Use vLLM's list-based logprob output (for comparison).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs and CI).")
def cache_teacher_cmd(**o) -> None:
    """Stage one: run the teacher over a dataset and write (or resume) a cache."""
    from adakd.pipeline.capture import CaptureConfig, DataError, EngineError, cache_teacher
    from adakd.common.data import DataSpec

    spec = DataSpec(
        source=o["data"], split=o["split"], config=o["data_config"], shape=o["shape"], prompt_field=o["prompt_field"],
        instruction_field=o["instruction_field"], input_field=o["input_field"], response_field=o["response_field"],
        messages_field=o["messages_field"], text_field=o["text_field"], prompt_template=o["prompt_template"],
        limit=o["limit"],
    )
    k = o["k"] if o["k"] is not None else {"topk": 64, "hybrid": 8, "sampled": 0}[o["targets"]]
    cfg = CaptureConfig(
        teacher=o["teacher"], data=spec, out=o["out"], k=k, engine=o["engine"], tokenizer=o["tokenizer"],
        targets=o["targets"], samples=o["samples"], sample_temperature=o["sample_temperature"],
        sample_seed=o["sample_seed"],
        dtype=o["dtype"], max_length=o["max_length"], length_policy=o["length_policy"], num_workers=o["num_workers"],
        worker_index=o["worker_index"], batch_tokens=o["batch_tokens"], packing=o["packing"], row_tokens=o["row_tokens"],
        tensor_parallel_size=o["tensor_parallel_size"],
        gpu_memory_utilization=o["gpu_memory_utilization"], shard_positions=o["shard_positions"],
        trust_remote_code=o["trust_remote_code"], vllm_fast_path=not o["vllm_stock_path"], show_progress=not o["no_progress"],
    )
    try:
        summary = cache_teacher(cfg)
    except (DataError, EngineError, storage.CacheError) as e:
        click.echo(f"Error: {storage.redact(str(e))}", err=True)
        _finish(1)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: every shard listed in {storage.redact(cfg.out)} is complete; re-run the same "
                   "command to resume", err=True)
        _finish(INTERRUPTED)
    click.echo(storage.redact(summary.format()))
    _finish(0)


@main.command("generate", cls=_Command, context_settings=CONTEXT, short_help="The student answers prompts (on-policy records).", epilog="""\b
Example (two samples per prompt, then the teacher scores the student's own answers):
  adakd generate --model runs/student/final --data prompts.jsonl --out runs/gen.jsonl --samples 2
  cache-teacher --teacher TEACHER --data runs/gen.jsonl --out runs/gen-cache
Two workers write runs/gen.worker-0000i-of-00002.jsonl; --merge joins them into runs/gen.jsonl.
Guide: docs/on-policy.md""")
@click.option("--model", default=None, help="Student: a local Hugging Face directory (with its tokenizer) or a hub name available offline.")
@click.option("--data", "data", required=True, help="Prompts: instruction rows (prompt, or instruction + input; a response column is ignored) or chat rows (messages; answered at the last user turn). Files, directory, glob or a hub name, as cache-teacher.")
@click.option("--out", required=True, help="Output .jsonl, a local path or a store URI (s3://bucket/gen.jsonl: uploaded in chunks to OUT.parts/, see docs/object-stores.md); with --num-workers W > 1 each worker writes OUT's stem + .worker-<i>-of-<W>.jsonl (a store: OUT.parts/worker-<i>-of-<W>/).")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True, help="auto: vLLM when installed, else transformers.")
@click.option("--samples", type=int, default=1, show_default=True, help="Responses per prompt.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Tokens generated per response at most.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample j of row r is drawn with a generator seeded from (seed, r, j).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--split", default="train", show_default=True, help="Split, for hub datasets.")
@click.option("--data-config", default=None, help="Configuration name, for hub datasets.")
@click.option("--shape", type=click.Choice(["auto", "instruction", "chat"]), default="auto", show_default=True, help="Record shape.")
@click.option("--prompt-field", default=None, help="Column with a pre-rendered prompt [default: prompt, if present].")
@click.option("--instruction-field", default=None, help="Instruction column [default: instruction/question].")
@click.option("--input-field", default=None, help="Optional context column [default: input/context].")
@click.option("--messages-field", default=None, help="Chat messages column [default: messages/conversations].")
@click.option("--prompt-template", default=None, help="Template with {instruction} and {input} [default: MiniLLM's, as cache-teacher].")
@click.option("--limit", type=int, default=None, help="Use only the first N rows.")
@click.option("--num-workers", type=int, default=1, show_default=True, envvar="ADAKD_NUM_WORKERS", help="Processes sharing the prompts (worker i takes rows i, i+W, ...).")
@click.option("--worker-index", type=int, default=0, show_default=True, envvar="ADAKD_WORKER_INDEX", help="This process's index in 0..num-workers-1.")
@click.option("--merge", is_flag=True, help="Generate nothing: join the --num-workers worker files of OUT into OUT, ordered by row and sample (what one worker writes).")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True, help="vLLM GPU memory share.")
@click.option("--staging", default=None, help="A store --out: local folder for the worker's staging file [default: the system's temporary folder].")
@click.option("--chunk-records", type=int, default=64, show_default=True, help="A store --out: records per uploaded chunk at most (a chunk also goes up every 60 s).")
@click.option("--trust-remote-code", is_flag=True, help="Allow model/tokenizer code from the model directory (off by default).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs and CI).")
def generate_cmd(**o) -> None:
    """The student answers each prompt (--samples times); every line is a record cache-teacher reads as is, its
    trained positions exactly the generated tokens. Resumes where a previous run stopped."""
    from adakd.common.data import DataError, DataSpec
    from adakd.pipeline.engine import EngineError
    from adakd.pipeline.generate import GenerateConfig, generate, merge_workers

    try:
        if o["merge"]:
            n = merge_workers(o["out"], o["num_workers"])
            click.echo(f"{storage.redact(o['out'])}: {n:,} lines from {o['num_workers']} worker files")
            return
        if not o["model"]:
            raise click.ClickException("--model is required (the student that generates)")
        spec = DataSpec(source=o["data"], split=o["split"], config=o["data_config"], shape=o["shape"],
                        prompt_field=o["prompt_field"], instruction_field=o["instruction_field"],
                        input_field=o["input_field"], messages_field=o["messages_field"],
                        prompt_template=o["prompt_template"], limit=o["limit"])
        cfg = GenerateConfig(model=o["model"], data=spec, out=o["out"], engine=o["engine"], samples=o["samples"],
                             temperature=o["temperature"], top_p=o["top_p"], max_new_tokens=o["max_new_tokens"],
                             seed=o["seed"], num_workers=o["num_workers"], worker_index=o["worker_index"],
                             dtype=o["dtype"], trust_remote_code=o["trust_remote_code"],
                             gpu_memory_utilization=o["gpu_memory_utilization"], show_progress=not o["no_progress"],
                             staging=o["staging"], chunk_records=o["chunk_records"])
        summary = generate(cfg)
    except (DataError, EngineError) as e:
        click.echo(f"Error: {storage.redact(str(e))}", err=True)
        _finish(1)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: every whole line (a store --out: every uploaded chunk) in {storage.redact(o['out'])} "
                   "stays; re-run the same command to resume", err=True)
        _finish(INTERRUPTED)
    click.echo(summary.format())
    _finish(0)


def _local_copy(location: str, option: str) -> str:
    """A model folder on a store, downloaded into a temporary directory that goes when the command ends
    (transformers loads directories); a local path as it is."""
    if not storage.is_uri(location):
        return location
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="adakd-model-")
    click.get_current_context().call_on_close(lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        n = storage.get_folder(location, tmp)
    except (storage.CacheError, OSError) as e:
        raise click.ClickException(f"{option} {storage.redact(location)}: cannot be downloaded ({e})") from e
    if not n:
        raise click.ClickException(f"{option} {storage.redact(location)}: no files there; give a model folder, such "
                                   "as train-student's OUT/final")
    return tmp


def _local_output(target: str) -> str:
    """Where a command writes an output file: `target` itself, or for a store URI a temporary file that
    `_publish_output` uploads once it is complete (an object store has no partial files to show)."""
    if not storage.is_uri(target):
        return target
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="adakd-output-")
    click.get_current_context().call_on_close(lambda: shutil.rmtree(tmp, ignore_errors=True))
    return os.path.join(tmp, target.partition("?")[0].rstrip("/").rsplit("/", 1)[-1] or "output")


def _publish_output(local: str, target: str, option: str) -> None:
    if local == target:
        return
    try:
        storage.put_file(local, target)
    except (storage.CacheError, OSError) as e:
        raise click.ClickException(f"{option} {storage.redact(target)}: cannot be written ({e}); check the bucket, "
                                   "credentials and endpoint (docs/object-stores.md)") from e


def _finish(code: int) -> None:
    """Exit; after vLLM ran, skip interpreter teardown, where vLLM's CPU build can abort
    ("terminate called without an active exception"). Everything written is already fsynced."""
    engine = sys.modules.get("adakd.pipeline.engine_vllm")
    if engine is not None and engine.STARTED["engine"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@main.command("train-student", cls=_Command, context_settings=CONTEXT, short_help="Stage two: train a student from a cache (AdaKD).", epilog="""\b
Example (a 2-layer student of the teacher's shape, random init, AdaKD over reverse KL):
  train-student --cache runs/stories-train --student runs/student.json --out runs/student --max-steps 300
On-policy rounds: the ground-truth cache and round 1's, half each, from round 1's student:
  train-student --cache runs/off --cache runs/round1 --cache-weights 0.5,0.5 --student runs/r1/final --out runs/r2
Under torchrun: torchrun --nproc_per_node 8 -m adakd.cli train-student --config run.yaml
Guide: docs/train-student.md""")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="YAML file of options (names as below, dashes or underscores); command-line options override it.")
@click.option("--cache", multiple=True, help="Cache written by cache-teacher; repeat it to mix several (on-policy rounds), sequence by sequence, in the shares of --cache-weights.")
@click.option("--cache-weights", default=None, help="Several --cache: each one's share of the sequences, comma-separated in --cache order (e.g. 0.5,0.25,0.25; normalized) [default: equal].")
@click.option("--student", help="Student: a Hugging Face model directory (pretrained) or a config.json (random init).")
@click.option("--out", help="Output directory: checkpoints/, final/, train_log.jsonl; a local path or a store URI such as s3://bucket/student (docs/object-stores.md).")
@click.option("--loss", type=click.Choice(LOSSES), default="rkl", show_default=True, help="Base divergence (forward/reverse KL, Jensen-Shannon, skew forward/reverse KL, total variation, adaptive KL, alpha-beta divergence).")
@click.option("--adakd/--no-adakd", default=True, show_default=True, help="AdaKD (LATF + IDTS) on top of the base divergence.")
@click.option("--no-latf", is_flag=True, help="AdaKD without token focusing (ablation).")
@click.option("--no-idts", is_flag=True, help="AdaKD without per-token temperatures (ablation).")
@click.option("--kd-weight", type=float, default=1.0, show_default=True, help="a in (1 - a) * CE + a * KD; 0 is plain fine-tuning.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Base distillation temperature.")
@click.option("--temperature-scale", type=float, default=0.5, show_default=True, help="IDTS scale c in T_i = T exp(-c tanh(ln(s_i / median))): harder-than-median positions colder for c > 0 (published), hotter for c < 0 (the official code's \"soften\" direction).")
@click.option("--latf-eps", type=float, default=0.05, show_default=True, help="LATF: relative change of the KD loss's moving average that moves the ratio (eps).")
@click.option("--latf-step", type=float, default=0.05, show_default=True, help="LATF: the ratio is multiplied by 1 - step (loss falling) or 1 + step (rising) (sigma).")
@click.option("--latf-decay", type=float, default=0.99, show_default=True, help="LATF: decay of the KD loss's moving average.")
@click.option("--latf-floor", type=float, default=0.1, show_default=True, help="LATF: the smallest share of positions distilled.")
@click.option("--jsd-beta", type=float, default=0.1, show_default=True, help="JSD: the teacher's weight in the mixture.")
@click.option("--skew", type=float, default=0.1, show_default=True, help="Skew KL weight.")
@click.option("--abkd-alpha", type=float, default=0.2, show_default=True, help="abkd: alpha, the power of the teacher's probabilities (>= 0; alpha 1, beta 0 is forward KL).")
@click.option("--abkd-beta", type=float, default=0.7, show_default=True, help="abkd: beta, the power of the student's probabilities (>= 0; alpha 0, beta 1 is reverse KL).")
@click.option("--sampled-estimator", type=click.Choice(["auto", "importance", "support"]), default="auto", show_default=True, help="Sampled and hybrid caches: importance (unbiased at T = 1; heavy-tailed for rkl-like losses), support (the stored ids exactly, one bucket for the rest: bounded, biased like top-k), auto (importance for fkl and sfkl, support otherwise).")
@click.option("--akl-mu", type=float, default=0.5, show_default=True, help="AKL head mass.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Peak learning rate (AdamW; linear warm-up, cosine decay to 10%).")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay (matrices only; not biases and norms).")
@click.option("--warmup-fraction", type=float, default=0.05, show_default=True, help="Of total steps; also LATF's warm-up.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps [default: --epochs over the cache].")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the cache, when --max-steps is not given.")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Tokens the student computes per micro-batch and process (rows x row length, padding included).")
@click.option("--packing/--no-packing", default=True, show_default=True, help="Several whole sequences per row, attention confined to each (no padding between them); --no-packing: one sequence per row, right-padded. A student whose forward cannot take packed rows exactly gets padded rows, with a note.")
@click.option("--row-tokens", type=int, default=ROW_TOKENS, show_default=True, help="Packed row length (attention costs rows x length^2 with a dense mask); a longer sequence gets a row of its own length.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute each layer's activations in the backward pass (non-reentrant; with DDP, FSDP, packing, resume): less activation memory for more compute.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step (the loss is averaged per trained token over the whole step).")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient norm clipping; 0 to disable.")
@click.option("--chunk-positions", type=int, default=1024, show_default=True, help="Positions per loss chunk (memory: chunk x vocabulary floats).")
@click.option("--max-length", type=int, default=None, help="Cut cache sequences to this many tokens (for a student whose context is shorter than the cache's sequences; their later positions are not trained).")
@click.option("--seed", type=int, default=0, show_default=True, help="Data order and random initialization.")
@click.option("--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: at the end only).")
@click.option("--keep-last", type=int, default=0, show_default=True, help="Keep only the N newest checkpoints on disk (0: all); resuming needs only the newest.")
@click.option("--stop-after", type=int, default=None, help="Stop (with a checkpoint) after N steps in this run; re-run to continue (time-limited jobs).")
@click.option("--fsdp", is_flag=True, help="Shard the student with FSDP2 (fully_shard) under torchrun.")
@click.option("--allow-incomplete-cache", is_flag=True, help="Train on a cache whose workers are not all done.")
@click.option("--tensorboard", is_flag=True, help="Also log to OUT/tensorboard.")
@click.option("--plot", is_flag=True, help="Draw loss, LATF ratio and temperature histogram to OUT/train_plot.png.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model/tokenizer code from the student's directory (off by default).")
@click.option("--router-aux-loss/--no-router-aux-loss", default=True, show_default=True, help="A mixture-of-experts student: add its router load-balancing loss (router_aux_loss_coef x the family's load_balancing_loss_func, padding excluded) to the training loss, as the family's own training does; logged as router_aux.")
@click.option("--live-teacher", default=None, help="Teacher directory: use its exact full-vocabulary distribution, computed live, instead of the cached top-k (to measure what the cache costs; needs the teacher in memory).")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs and CI).")
@click.pass_context
def train_student_cmd(ctx: click.Context, config_file: str | None, **o) -> None:
    """Stage two: train a student on a cache with sparse-target KD and AdaKD (resumes from OUT/checkpoints)."""
    from adakd.trainer.adakd import AdaKDConfig
    from adakd.trainer.checkpoint import CheckpointError
    from adakd.trainer.outdir import check_out
    from adakd.trainer.kd_loss import LossConfig
    from adakd.trainer.mix import parse_weights
    from adakd.trainer.train import TrainConfig, TrainError, train

    if config_file:
        import yaml

        loaded = yaml.safe_load(open(config_file)) or {}
        if not isinstance(loaded, dict):
            raise click.ClickException(f"{config_file}: expected a mapping of option names to values")
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in o:
                raise click.ClickException(f"{config_file}: unknown option {key!r}")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT:
                param = next(p for p in ctx.command.params if p.name == name)
                if name == "cache" and isinstance(value, str):
                    value = [value]  # `cache: A` or a list `cache: [A, B]`
                elif name == "cache_weights" and isinstance(value, (list, tuple)):
                    value = ",".join(str(v) for v in value)  # `cache_weights: [0.5, 0.5]`
                o[name] = value if value is None else param.type_cast_value(ctx, value)  # YAML values get the option's type
    for req in ("cache", "student", "out"):
        if not o[req]:
            raise click.ClickException(f"--{req} is required (on the command line or in --config)")
    for name, low in (("grad_accum", 1), ("batch_tokens", 1), ("row_tokens", 1), ("chunk_positions", 1), ("epochs", 1), ("max_steps", 1),
                      ("stop_after", 1), ("save_every", 0), ("max_length", 2), ("keep_last", 0)):
        if o[name] is not None and o[name] < low:
            raise click.ClickException(f"--{name.replace('_', '-')} must be at least {low}, not {o[name]}")
    try:
        loss = LossConfig(
            loss=o["loss"], kd_weight=o["kd_weight"], temperature=o["temperature"], jsd_beta=o["jsd_beta"], skew=o["skew"],
            akl_mu=o["akl_mu"], abkd_alpha=o["abkd_alpha"], abkd_beta=o["abkd_beta"], chunk_positions=o["chunk_positions"],
            sampled_estimator=o["sampled_estimator"],
            adakd=AdaKDConfig(latf=o["adakd"] and not o["no_latf"], idts=o["adakd"] and not o["no_idts"],
                              temperature_scale=o["temperature_scale"], loss_ratio_eps=o["latf_eps"],
                              ratio_step=o["latf_step"], ema_decay=o["latf_decay"], min_ratio=o["latf_floor"]),
        )
        cfg = TrainConfig(
            cache=o["cache"][0] if len(o["cache"]) == 1 else list(o["cache"]), cache_weights=o["cache_weights"],
            student=o["student"], out=o["out"], loss=loss, lr=o["lr"], weight_decay=o["weight_decay"],
            warmup_fraction=o["warmup_fraction"], max_steps=o["max_steps"], epochs=o["epochs"],
            batch_tokens=o["batch_tokens"], packing=o["packing"], row_tokens=o["row_tokens"],
            gradient_checkpointing=o["gradient_checkpointing"], grad_accum=o["grad_accum"], clip=o["clip"], seed=o["seed"],
            save_every=o["save_every"], keep_last=o["keep_last"], stop_after=o["stop_after"], fsdp=o["fsdp"], allow_incomplete_cache=o["allow_incomplete_cache"],
            tensorboard=o["tensorboard"], plot=o["plot"], trust_remote_code=o["trust_remote_code"],
            progress=not o["no_progress"], live_teacher=o["live_teacher"], max_length=o["max_length"],
            router_aux_loss=o["router_aux_loss"],
        )
        parse_weights(cfg.cache_weights, len(cfg.caches))  # before any work
        check_out(cfg.out)  # before any work
        result = train(cfg)
    except (ValueError, TrainError, CheckpointError, storage.CacheError) as e:  # CacheError: damage met mid-run
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"\ninterrupted: the last checkpoint in {storage.redact(storage.join_uri(cfg.out, 'checkpoints'))} "
                       "is intact; re-run the same command to resume from it", err=True)
        sys.exit(INTERRUPTED)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["last"]
        where = f"student in {storage.redact(result['final'])}" if result["final"] else "stopped early: re-run to continue"
        click.echo(f"trained {result['steps']}/{result['total']} steps; last loss {last.get('loss', float('nan')):.4f}; "
                   f"{where}; log in {storage.redact(result['log'])}")


@main.command("eval", short_help="Score a student: cache, live teacher, generation.", epilog="""\b
Examples:
  adakd eval --model runs/student/final --cache runs/stories-test
  adakd eval --model runs/student/final --data ../shared/data/dolly/test.jsonl --limit 50
  adakd eval --model runs/student/final --teacher ../shared/models/stories260K --data ../shared/data/tinystories/test.jsonl
On-policy (the student samples, the teacher scores every sampled token):
  adakd eval --model runs/student/final --teacher ../shared/models/stories260K --data prompts.jsonl --generate --samples 4""")
@click.option("--model", "model_dir", required=True, help="Student (Hugging Face directory, or a store URI such as s3://bucket/student/final, downloaded for the run) to evaluate.")
@click.option("--teacher", "teacher_dir", default=None, help="Teacher directory, run live: exact full-vocabulary KL(teacher || student) and KL(student || teacher), both models' NLL and top-1 agreement, on the sequences of --cache or of the --data file read as cache-teacher reads it (instead of generation).")
@click.option("--cache", help="Held-out cache: NLL, KL(teacher || student) on the cached support, top-1 agreement.")
@click.option("--data", help="jsonl of `prompt`/`output` lines (MiniLLM/DistiLLM) or chat `messages` lines (the last assistant turn is the reference): generate and score ROUGE-L.")
@click.option("--out-file", default=None, help="Where generations go, a local path or a store URI [default: MODEL/generations.jsonl].")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Generation: tokens generated per prompt at most.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Generation: prompts per batch.")
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Generation: sampling seed (with --do-sample).")
@click.option("--limit", type=int, default=None, help="Only the first N prompts (with --teacher: the first N records of --data).")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="Cache and --teacher evaluation: computed tokens per batch (rows x row length).")
@click.option("--packing/--no-packing", default=True, show_default=True, help="Cache and --teacher evaluation: packed rows (as train-student), or one padded sequence per row.")
@click.option("--max-positions", type=click.IntRange(min=1), default=None, help="Cache and --teacher evaluation: at most this many trained positions (exactly, in input order).")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Cache and --teacher evaluation: cut sequences to this many tokens (a model with a shorter context).")
@click.option("--generate", is_flag=True, help="On-policy (with --teacher and --data PROMPTS): the student samples responses (--samples, --temperature, --top-p, --max-new-tokens, --seed) and the live teacher scores every sampled token: exact KL(student || teacher), both models' NLL of the samples; teacher-forced numbers beside them on the rows' `output`s and on --cache. --out-file: the samples (none by default).")
@click.option("--samples", type=int, default=1, show_default=True, help="--generate: responses sampled per prompt.")
def eval_cmd(model_dir: str, teacher_dir: str | None, cache: str | None, data: str | None, out_file: str | None,
             max_new_tokens: int, batch_size: int, do_sample: bool, temperature: float, top_p: float, seed: int,
             limit: int | None, batch_tokens: int, packing: bool, max_positions: int | None, max_length: int | None,
             generate: bool = False, samples: int = 1) -> None:
    """Evaluate a student: on a held-out teacher cache (--cache), against the live teacher (--teacher with --cache or
    --data), and/or by generation (--data)."""
    import json

    from adakd.trainer.evaluate import EvalDataError, evaluate_cache, evaluate_generation
    from adakd.trainer.student import StudentError

    model_uri = model_dir
    model_dir = _local_copy(model_dir, "--model")

    if generate:
        from adakd.trainer.onpolicy_eval import OnPolicyError, format_report, report

        if not teacher_dir or not data:
            raise click.ClickException("--generate needs --teacher TEACHER_DIR (it scores the samples) and --data "
                                       "PROMPTS (a jsonl of prompt, instruction or chat messages lines)")
        local_out = _local_output(out_file) if out_file else None
        try:
            r = report(model_dir, _local_copy(teacher_dir, "--teacher"), data, cache=cache, samples=samples,
                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, limit=limit,
                       batch_size=batch_size, batch_tokens=batch_tokens, packing=packing, out_file=local_out)
        except (OnPolicyError, StudentError, EvalDataError, storage.CacheError) as e:
            raise click.ClickException(str(e)) from e
        if out_file:
            _publish_output(local_out, out_file, "--out-file")
        click.echo(format_report(r))
        click.echo(json.dumps(r))
        return
    if teacher_dir:
        from adakd.trainer.teacher_eval import evaluate_teacher, format_line

        if bool(cache) == bool(data):
            raise click.ClickException("with --teacher give one held-out input: --cache CACHE (its sequences) or "
                                       "--data FILE (read as cache-teacher reads it)")
        try:
            r = evaluate_teacher(model_dir, teacher_dir, cache=cache, data=data, batch_tokens=batch_tokens,
                                 max_positions=max_positions, max_length=max_length, limit=limit, packing=packing)
        except (StudentError, EvalDataError, storage.CacheError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(format_line(r))
        click.echo(json.dumps({"teacher": r}))
        return
    if not cache and not data:
        raise click.ClickException("give --cache (teacher-cache metrics) and/or --data (generation + ROUGE-L), or "
                                   "--teacher with one of them")
    result: dict = {}
    try:
        if cache:
            r = evaluate_cache(model_dir, cache, batch_tokens, max_positions=max_positions, max_length=max_length,
                               packing=packing)
            click.echo(f"cache: positions {r['positions']:,}  NLL {r['nll']:.4f}  KL(teacher||student) {r['kl']:.4f}  "
                       f"top-1 agreement {r['top1_agreement']:.2%}")
            result["cache"] = r
        if data:
            out_file = out_file or storage.join_uri(model_uri, "generations.jsonl")
            local_out = _local_output(out_file)
            r = evaluate_generation(model_dir, data, local_out, max_new_tokens, batch_size, do_sample, temperature,
                                    top_p, seed, limit)
            _publish_output(local_out, out_file, "--out-file")
            click.echo(f"generation: {r['n']} prompts  ROUGE-L {r['rougeL']:.2f}  (generations in "
                       f"{storage.redact(out_file)})")
            result["generation"] = r
    except (StudentError, EvalDataError, storage.CacheError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result))


@main.command("distill", cls=_Command, context_settings=CONTEXT, short_help="On-policy rounds: generate, cache, train.", epilog="""\b
Example (two rounds from a warm-up on the off-policy cache; docs/on-policy.md shows the config):
  adakd distill --config rounds.yaml
  adakd distill --config rounds.yaml --print      (each stage's command, for a cluster's job scripts)""")
@click.option("--config", "config_file", required=True, type=click.Path(exists=True, dir_okay=False), help="YAML file of the rounds: teacher, student, prompts, out, rounds, off_policy, on_policy_weight, warmup, generate, cache, train, seed, devices (docs/on-policy.md).")
@click.option("--print", "print_only", is_flag=True, help="Print every stage's command, one per line, and run nothing.")
def distill(config_file: str, print_only: bool) -> None:
    """On-policy distillation in rounds: per round the student generates (adakd generate), the teacher scores its
    text offline (cache-teacher), the student trains on the off-policy cache mixed with the new one
    (train-student); each stage its own process. Re-run after a kill: finished stages are skipped, the
    interrupted one resumes."""
    import shlex

    from adakd import rounds

    try:
        cfg = rounds.RoundsConfig.load(config_file)
        if print_only:
            for stage in rounds.plan(cfg):
                click.echo(f"# {stage.name}\nadakd {shlex.join(stage.argv)}")
            return
        ran = rounds.run(cfg, echo=lambda m: click.echo(m, err=True))
    except rounds.RoundsError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{len(ran)} stage(s) run; the last round's student: {rounds.final_student(cfg)}")


@main.command(short_help="The whole pipeline offline on a built-in task.", epilog="""\b
Example:
  adakd demo --out runs/demo""")
@click.option("--out", default="runs/demo", show_default=True, help="Directory for everything the demo makes.")
@click.option("--fast", is_flag=True, help="A tiny variant (seconds, for tests): the numbers mean nothing.")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="hf", show_default=True, help="Teacher engine for the demo's cache-teacher runs (hf: they are tiny, and a vLLM start per cache would cost more than the caches).")
@click.option("--seeds", type=int, default=2, show_default=True, help="Seeds (transfer sets and data orders) per student method (python -m bench.ablation compares AdaKD's parts over 3, with intervals).")
def demo(out: str, fast: bool, engine: str, seeds: int) -> None:
    """The whole pipeline offline on a built-in task where the truth is known: a teacher, its caches, students
    trained by CE, forward/reverse KL and AdaKD over each, and by on-policy rounds (the student's own answers,
    scored by the teacher through a cache), all scored against the true answer distributions."""
    from adakd import demo as demo_mod

    if seeds < 1:
        raise click.BadParameter("must be at least 1", param_hint="--seeds")
    if storage.is_uri(out):
        raise click.BadParameter("the demo writes a local directory (its caches, students and report); give a local "
                                 "path", param_hint="--out")
    cfg = demo_mod.DemoConfig.fast(out) if fast else demo_mod.DemoConfig(out=out, engine=engine, seeds=seeds)
    if fast:
        cfg.engine = engine
    demo_mod.demo(cfg)


@main.command(short_help="Check a cache; exit 1 on damage or a missing worker.", epilog="""\b
Examples:
  adakd verify runs/stories-train
  adakd verify s3://bucket/cache --allow-incomplete    (while workers are still running)""")
@click.argument("cache")
@click.option("--allow-incomplete", is_flag=True, help="A worker that has not finished is a warning, not a problem (check a cache still being written).")
def verify(cache: str, allow_incomplete: bool) -> None:
    """Check every shard of CACHE (checksums, schema, decoding, counts) and that every worker finished; exit 1
    on any problem."""
    report = storage.verify_cache(cache)
    for w in report.warnings + (report.incomplete if allow_incomplete else []):
        click.echo(f"warning: {storage.redact(w)}", err=True)
    for p in report.problems:
        click.echo(f"problem: {storage.redact(p)}", err=True)
    for w in report.incomplete if not allow_incomplete else []:
        click.echo(f"problem: {storage.redact(w)}", err=True)
    if report.incomplete and not allow_incomplete:
        click.echo(f"problem: {storage.redact(report.cache)}: the cache is incomplete ({report.workers_done}/"
                   f"{report.workers} workers done); finish (or resume) cache-teacher for the missing workers, or pass "
                   "--allow-incomplete to check only what is there", err=True)
    click.echo(
        f"{storage.redact(report.cache)}: {report.shards_ok}/{report.shards} shards ok, {report.positions:,} positions "
        f"decoded, {report.workers_done}/{report.workers} workers done, {len(report.problems)} problem(s), "
        f"{len(report.warnings)} warning(s)"
    )
    sys.exit(0 if report.ok and (allow_incomplete or not report.incomplete) else 1)


@main.command(short_help="Summarize a cache: sizes, coverage, plot.", epilog="""\b
Example:
  adakd inspect runs/stories-train --plot runs/coverage.png""")
@click.argument("cache")
@click.option("--plot", "plot_path", help="Write histograms of top-k mass and top-1 probability to this PNG (a local path or a store URI).")
@click.option("--max-positions", type=int, default=2_000_000, show_default=True, help="Positions decoded (from the start) for the coverage statistics; 0 for all.")
def inspect(cache: str, plot_path: str | None, max_positions: int | None) -> None:
    """Summarize CACHE: teacher, tokenizer, k, shards, sequences, tokens, bytes, coverage."""
    try:
        s = storage.summarize(cache, max_positions=max_positions or None)
    except storage.CacheError as e:
        raise click.ClickException(str(e)) from e
    click.echo(storage.format_summary(s))
    if plot_path:
        local = _local_output(plot_path)
        storage.plot_summary(s, local)
        _publish_output(local, plot_path, "--plot")
        click.echo(f"plot written to {storage.redact(plot_path)}")


def cache_teacher_main() -> None:
    """Console script `cache-teacher` (the command itself, so its usage line and hints name `cache-teacher`)."""
    cache_teacher_cmd.main(sys.argv[1:], prog_name="cache-teacher")


def train_student_main() -> None:
    """Console script `train-student`."""
    train_student_cmd.main(sys.argv[1:], prog_name="train-student")


if __name__ == "__main__":
    main()
