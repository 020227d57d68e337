"""Every entry point's --help: every option described, with its default; one syntax for lists."""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

# Every `python -m` command of the project (README "The commands", benchmarks, build and demo).
ENTRY_POINTS = [
    "ingest.__main__", "ingest.demo", "shards.__main__", "augment_dali.stats", "augment_dali.preview",
    "augment_dali.build", "train.main", "train.export", "train.plot", "train.downstream.__main__",
    "benchmarks.ingest", "benchmarks.augment", "benchmarks.train_step", "benchmarks.index_memory",
    "ingest.paths", "augment_dali.harness", "benchmarks.fuzz", "benchmarks.verify", "benchmarks.startup",
    "benchmarks.gpu_kit", "benchmarks.gpu_check", "benchmarks.gpu_augment", "benchmarks.gpu_train_check",
    "benchmarks.representation", "benchmarks.augment3d",
]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command builds, caught at its parse_args call (the command itself does not run)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    module = importlib.import_module(module_name)
    try:
        module.main([])
    except _Captured as c:
        return c.parser
    raise AssertionError(f"{module_name}.main([]) returned without parsing arguments")


def _walk(parser: argparse.ArgumentParser):
    """(parser, action) for every argument, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)
        else:
            yield parser, action


def _has_default(action: argparse.Action) -> bool:
    if action.required or action.default in (None, argparse.SUPPRESS):
        return False
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction,
                           argparse._HelpAction)):
        return False  # a switch: off unless given
    return True


def test_every_option_of_every_entry_point_is_described_with_its_default(monkeypatch):
    bare, undefaulted, lists, progs = [], [], [], []
    for name in ENTRY_POINTS:
        with monkeypatch.context() as m:
            parser = _parser_of(name, m)
        if not parser.prog.startswith("python -m "):
            progs.append(f"{name}: usage names {parser.prog!r}")
        for owner, action in _walk(parser):
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            where = f"{owner.prog} {'/'.join(action.option_strings) or action.dest}"
            if not re.sub(r"\(?default[^)]*\)?", "", action.help or "").strip(" .;,"):
                bare.append(where)
            elif _has_default(action) and "default" not in action.help.lower():
                undefaulted.append(f"{where} (default {action.default!r})")
            if action.option_strings and action.nargs not in (None, "?", 0):
                lists.append(f"{where} takes nargs={action.nargs!r}: use one comma-separated value")
    assert not progs, progs
    assert not bare, f"options without help: {bare}"
    assert not undefaulted, f"help without the default: {undefaulted}"
    assert not lists, lists


def test_list_flags_take_comma_separated_values_everywhere():
    from benchmarks.train_step import build_parser as train_step_parser
    from train.config import load_config
    from train.downstream.__main__ import build_parser as downstream_parser

    assert load_config(["--synthetic", "--crop-sizes", "64,32", "--num-crops", "2,4"]).crop_sizes == (64, 32)
    args = train_step_parser().parse_args(["--crop-sizes", "64,32", "--num-crops", "2,4"])
    assert (tuple(args.crop_sizes), tuple(args.num_crops)) == ((64, 32), (2, 4))
    args = downstream_parser().parse_args(["label-efficiency", "--data", "d.npz", "--pretrained", "b.pt",
                                           "--out", "o", "--fractions", "1,10,100"])
    assert tuple(args.fractions) == (0.01, 0.1, 1.0)
