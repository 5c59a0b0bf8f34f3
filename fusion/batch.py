"""WindowBatch: raw per-modality inputs of B windows, stacked per modality.

A window is a mapping Modality -> raw numpy array (see encoders/*.py for each modality's raw
format); a modality the window lacks is simply an absent key. Collating keeps, per modality,
only the rows that have it:

    raw[m]:  stacked raw arrays of the n_m windows that have modality m   [n_m, ...]
    rows[m]: int64 [n_m], which batch row (window index) each of them belongs to

so the model never sees placeholder data for an absent modality.

Shape comments use the dimension names of the legend in encoders/__init__.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from encoders.base import RawInfo
from encoders.modality import ALL_MODALITIES, Modality


@dataclass(frozen=True)
class WindowBatch:
    size: int  # B: number of windows
    raw: dict[Modality, Tensor]  # modality -> [n_m, ...] raw inputs of the rows that have it
    rows: dict[Modality, Tensor]  # modality -> int64 [n_m] batch row of each raw input
    audio_sample_rate: int  # Hz of raw[AUDIO] (checked against the model's rate)

    @classmethod
    def collate(
        cls, windows: Sequence[Mapping[Modality, np.ndarray]], audio_sample_rate: int
    ) -> WindowBatch:
        raw: dict[Modality, Tensor] = {}
        rows: dict[Modality, Tensor] = {}
        for i, window in enumerate(windows):
            unknown = [k for k in window if k not in ALL_MODALITIES]
            if unknown:
                raise ValueError(
                    f"window {i}: unknown modality key(s) {unknown}; use "
                    f"encoders.modality.Modality keys"
                )
        for m in ALL_MODALITIES:
            idx = [i for i, w in enumerate(windows) if m in w]
            if not idx:
                continue
            arrays = [np.asarray(windows[i][m]) for i in idx]
            shapes = {(a.shape, a.dtype.str) for a in arrays}
            if len(shapes) > 1:
                raise ValueError(
                    f"{m}: windows have different raw shapes/dtypes "
                    f"{sorted(shapes)}; every window must use the model's format"
                )
            raw[m] = torch.from_numpy(np.stack(arrays))  # n_m x [...] -> [n_m, ...]
            rows[m] = torch.tensor(idx, dtype=torch.int64)  # [n_m]
        return cls(size=len(windows), raw=raw, rows=rows, audio_sample_rate=audio_sample_rate)

    def to(self, device: torch.device | str) -> WindowBatch:
        return WindowBatch(
            size=self.size,
            raw={m: x.to(device) for m, x in self.raw.items()},
            rows={m: r.to(device) for m, r in self.rows.items()},
            audio_sample_rate=self.audio_sample_rate,
        )

    @property
    def info(self) -> RawInfo:
        return RawInfo(audio_sample_rate=self.audio_sample_rate)
