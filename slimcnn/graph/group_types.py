"""The records a channel group is made of: which layers' channels go together, in which role. Apart from
:mod:`slimcnn.graph.groups` (which finds them by tracing) so that the layer handlers and the layer policy can
name them without importing the tracer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["out", "in", "bn", "dw"]


@dataclass(frozen=True)
class Member:
    """Group channel ``i`` is channel ``offset + i`` of ``module`` along the role's axis.

    Roles: ``out`` (conv/linear weight dim 0, PadShortcut ``dst``), ``in`` (conv/linear weight dim 1, PadShortcut
    ``src``), ``bn`` (norm vectors and running stats), ``dw`` (depthwise conv: its in and out channels are the
    same channels, so it both reads and produces the group).
    """

    module: str
    role: Role
    offset: int = 0


@dataclass
class ChannelGroup:
    """Channels that go together. ``key`` names the group (its first producer in forward order, with a
    ``[a:b]`` suffix when the group is only a slice of that producer's outputs).

    >>> g = ChannelGroup("conv1", 16, [Member("conv1", "out"), Member("bn1", "bn"), Member("layer1.0.conv1", "in")])
    >>> [m.module for m in g.producers], [m.module for m in g.consumers]
    (['conv1'], ['layer1.0.conv1'])
    """

    key: str
    size: int
    members: list[Member]
    prunable: bool = True
    reason: str = ""
    #: the fewest channels width allocation may leave (a ``--min-keep`` floor; see :mod:`slimcnn.graph.policy`)
    min_keep: int = 1

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "out"]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "in"]

    @property
    def depthwise(self) -> list[Member]:
        return [m for m in self.members if m.role == "dw"]

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        return f"ChannelGroup({self.key!r}, size={self.size}, {len(self.members)} members, {state})"
