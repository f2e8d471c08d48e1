"""The CLI's surface tells the truth: every `--help` names only commands and options that exist, every command
takes --threads (applied once, by the CLI), and `slimcnn models` lists what `--model` accepts.

The parser is built in-process (no subprocess per command) and its raw help strings are read, so a line wrap
can never split a `slimcnn <command>` mention and hide it from the check.
"""
from __future__ import annotations

import argparse
import os
import re

import pytest

from slimcnn.cli import build_parser, main

OPTION = re.compile(r"(?<![\w`-])--[a-z][a-z0-9-]*")
SLIMCNN_WORD = re.compile(r"\bslimcnn ([a-z][a-z0-9_-]*)")
CODE = re.compile(r"`([^`]+)`")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _texts(parser: argparse.ArgumentParser) -> list[str]:
    """Every sentence a user can read in ``parser``'s --help, with argparse's %-expansion applied."""
    fmt = parser._get_formatter()
    out = [(parser.description or "") % {"prog": parser.prog}, (parser.epilog or "") % {"prog": parser.prog}]
    out += [g.title or "" for g in parser._action_groups] + [g.description or "" for g in parser._action_groups]
    out += [fmt._expand_help(a) for a in parser._actions if a.help and a.help != argparse.SUPPRESS]
    return [t for t in out if t]


def _problems(text: str, owner: str | None, commands: dict[str, argparse.ArgumentParser],
              everywhere: set[str]) -> list[str]:
    """What ``text`` (help of command ``owner``; None: the top-level help) names that does not exist.

    A code span naming a command (`slimcnn compress --squeeze` or `compress --squeeze`) is checked against that
    command; an option anywhere else must exist on ``owner`` or on every command (``everywhere``).
    """
    problems = []

    def check(option: str, command: str | None) -> None:
        known = (_options(commands[command]) if command else set()) | everywhere
        if option not in known:
            problems.append(f"{option} (not an option of {'slimcnn ' + command if command else 'every command'})")

    for span in CODE.findall(text):
        words = span.split()
        target = owner
        if "slimcnn" in words:
            i = words.index("slimcnn")
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if nxt.isupper():  # a placeholder such as COMMAND: options must exist on every command
                target = None
            elif nxt and not nxt.startswith("-"):
                if nxt not in commands:
                    problems.append(f"`{span}` names a command that does not exist: {nxt}")
                    continue
                target = nxt
        elif words and words[0] in commands:
            target = words[0]
        for option in OPTION.findall(span):
            check(option, target)
    prose = CODE.sub(" ", text)
    for word in SLIMCNN_WORD.findall(prose):
        if word not in commands:
            problems.append(f"'slimcnn {word}' is not a command")
    for option in OPTION.findall(prose):
        check(option, owner)
    return problems


def test_every_help_names_only_existing_commands_and_options():
    parser = build_parser()
    commands = _commands(parser)
    everywhere = _options(parser) | set.intersection(*(_options(p) for p in commands.values()))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    problems = [f"slimcnn --help: {p}" for t in _texts(parser) for p in _problems(t, None, commands, everywhere)]
    for choice in sub._choices_actions:  # the one-line help each command shows in `slimcnn --help`
        problems += [f"slimcnn --help ({choice.dest}): {p}"
                     for p in _problems(choice.help or "", choice.dest, commands, everywhere)]
    for name, command in commands.items():
        problems += [f"slimcnn {name} --help: {p}"
                     for t in _texts(command) for p in _problems(t, name, commands, everywhere)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_issue_20_found():
    """The check itself: the old `--model` help pointed at an option that never existed."""
    parser = build_parser()
    commands = _commands(parser)
    everywhere = {"-h", "--help", "--threads"}
    assert _problems("zoo name (see `slimcnn profile --list`)", "eval", commands, everywhere)
    assert _problems("see `slimcnn zoo`", "eval", commands, everywhere)
    assert _problems("or 11 for --task segmentation", "profile", commands, everywhere)
    assert not _problems("or 11 for --task segmentation", "eval", commands, everywhere)
    assert not _problems("then `compress --method csgd --squeeze`", "profile", commands, everywhere)


def test_every_command_takes_threads_and_has_help():
    for name, command in _commands(build_parser()).items():
        action = next((a for a in command._actions if "--threads" in a.option_strings), None)
        assert action is not None and action.help, name


def test_threads_are_set_for_the_command_and_restored(monkeypatch, capsys):
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    before = torch.get_num_threads()
    assert main(["models", "cifar_resnet20", "--threads", "3"]) == 0
    assert calls == [3, before]

    calls.clear()  # default: OMP_NUM_THREADS when set, else the cores this process may use that others leave free
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main(["models", "cifar_resnet20"]) == 0
    assert calls == [2, before]
    calls.clear()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    busy = [0.0]  # cores other processes keep busy (commands/common.busy_cores_elsewhere), set by the test
    monkeypatch.setattr("slimcnn.commands.common.busy_cores_elsewhere", lambda: busy[0])
    assert main(["models", "cifar_resnet20"]) == 0
    assert calls == [4, before]
    calls.clear()
    busy[0] = 0.6  # a passing blip, not a job: every core
    assert main(["models", "cifar_resnet20"]) == 0
    assert calls == [4, before]
    calls.clear()
    busy[0] = 1.3  # another job keeps a core busy: its spinning OpenMP threads would slow both (README)
    assert main(["models", "cifar_resnet20"]) == 0
    assert calls == [3, before]
    calls.clear()
    busy[0] = 7.0  # never fewer than one thread
    assert main(["models", "cifar_resnet20"]) == 0
    assert calls == [1, before]
    calls.clear()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this machine share the cores
    assert main(["models", "cifar_resnet20"]) == 0
    assert calls == [2, before]
    capsys.readouterr()


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_threads_must_be_a_positive_integer(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["models", "--threads", bad])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_models_lists_the_zoo_and_the_torchvision_syntax(capsys):
    import torchvision

    import slimcnn

    assert main(["models", "--macs"]) == 0
    out = capsys.readouterr().out
    for name in slimcnn.list_models():
        assert f"  {name} " in out, name
    assert "tv:NAME" in out and "resnet18" in out and "mobilenet_v3_small" in out
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(re.findall(r"[\w]+", out))
    r20 = next(line for line in out.splitlines() if line.startswith("  cifar_resnet20 "))
    assert "40.55M" in r20 and "0.270M" in r20 and "rig,dig" in r20  # the published counts
    vgg = next(line for line in out.splitlines() if line.startswith("  cifar_vgg16 "))
    assert "rig,dig" not in vgg  # not a staged backbone: --gating refuses it
    with pytest.raises(TypeError):
        slimcnn.create("cifar_vgg16", gating="rig")


def test_models_pattern_filters_both_lists(capsys):
    assert main(["models", "tv:resnet1*"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "resnet101" in out and "resnet50" not in out and "cifar_resnet20" not in out


def test_busy_cores_elsewhere_excludes_this_process(monkeypatch):
    """Machine-wide busy time from /proc/stat less this process's own CPU time, per second of the window."""
    import io
    import types

    from slimcnn import backends as common

    hz = os.sysconf("SC_CLK_TCK")
    # /proc/stat's first line at the two samples: 3 s of busy ticks (user + system) pass, idle and iowait excluded
    stats = iter([f"cpu  {10 * hz} 0 {5 * hz} {100 * hz} {hz} 0 0 0 0 0\n",
                  f"cpu  {12 * hz} 0 {6 * hz} {101 * hz} {2 * hz} 0 0 0 0 0\n"])
    monkeypatch.setattr(common, "open", lambda path: io.StringIO(next(stats)), raising=False)
    clock = iter([0.0, 1.0])          # monotonic: a 1 s window
    own = iter([4.0, 4.5])            # this process used 0.5 s of CPU in it
    monkeypatch.setattr(common, "time", types.SimpleNamespace(
        monotonic=lambda: next(clock), process_time=lambda: next(own), sleep=lambda s: None))
    assert common.busy_cores_elsewhere() == 2.5
