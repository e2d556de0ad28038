"""The `adakd` command line: entry points only; the work lives in pipeline/, trainer/ and storage/."""

from __future__ import annotations

import sys

import click

import storage


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adakd")
def main() -> None:
    """Offline knowledge distillation: cache a teacher once, train students with AdaKD from the cache."""


@main.command("cache-teacher", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def cache_teacher_cmd() -> None:
    """Stage one: run the teacher over a dataset and write a cache (not implemented yet)."""
    raise click.ClickException("cache-teacher is not implemented yet (issue: cache-teacher)")


@main.command("train-student", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def train_student_cmd() -> None:
    """Stage two: train a student from a cache (not implemented yet)."""
    raise click.ClickException("train-student is not implemented yet (issue: train-student)")


@main.command()
@click.argument("cache")
def verify(cache: str) -> None:
    """Check every shard of CACHE (checksums, schema, decoding, counts); exit 1 on any problem."""
    report = storage.verify_cache(cache)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for p in report.problems:
        click.echo(f"problem: {p}", err=True)
    click.echo(
        f"{report.cache}: {report.shards_ok}/{report.shards} shards ok, {report.positions:,} positions decoded, "
        f"{len(report.problems)} problem(s), {len(report.warnings)} warning(s)"
    )
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("cache")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write histograms of top-k mass and top-1 probability to this PNG.")
@click.option("--max-positions", type=int, default=None, help="Decode at most this many positions for the statistics.")
def inspect(cache: str, plot_path: str | None, max_positions: int | None) -> None:
    """Summarize CACHE: teacher, tokenizer, k, shards, sequences, tokens, bytes, coverage."""
    try:
        s = storage.summarize(cache, max_positions=max_positions)
    except storage.CacheError as e:
        raise click.ClickException(str(e)) from e
    click.echo(storage.format_summary(s))
    if plot_path:
        storage.plot_summary(s, plot_path)
        click.echo(f"plot written to {plot_path}")


def cache_teacher_main() -> None:
    """Console script `cache-teacher`."""
    main(["cache-teacher", *sys.argv[1:]], prog_name="cache-teacher")


def train_student_main() -> None:
    """Console script `train-student`."""
    main(["train-student", *sys.argv[1:]], prog_name="train-student")


if __name__ == "__main__":
    main()
