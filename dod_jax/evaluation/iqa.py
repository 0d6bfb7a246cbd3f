"""The perceptual metrics of the paper's tables through pyiqa, when their weights are cached.

pyiqa runs offline here (HF_HUB_OFFLINE=1 is set before it loads): a metric whose weights are
not in $TORCH_HOME/hub/pyiqa (or the Hugging Face cache) fails to build, and is reported as
unavailable with the reason and the file it looked for, never as a number. pyiqa itself is
optional (`pip install 'dod-jax[metrics]'`).

Per image: LPIPS (pyiqa's, AlexNet), DISTS (with the GT), CLIPIQA, NIQE, MUSIQ, MANIQA (no
reference). Per set: FID between a folder of restorations and the folder of their GTs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np

FULL_REFERENCE = ("lpips", "dists")
NO_REFERENCE = ("clipiqa", "niqe", "musiq", "maniqa")
PER_IMAGE = FULL_REFERENCE + NO_REFERENCE
PER_SET = ("fid",)
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "fid"}
_DOWNLOAD = re.compile(r'Downloading: "[^"]+" to (\S+)')


class PyiqaMetrics:
    """The pyiqa metrics among `names` that can run here; `unavailable` maps the others to why."""

    def __init__(self, names=PER_IMAGE + PER_SET, device: str = "cpu"):
        self.metrics, self.unavailable = {}, {}
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import pyiqa
            import torch
        except ImportError as e:
            self.unavailable = {n: f"pyiqa is not installed ({e}); pip install 'dod-jax[metrics]'" for n in names}
            return
        self._torch = torch
        for name in names:
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                    self.metrics[name] = pyiqa.create_metric(name, device=device, as_loss=False)
            except Exception as e:  # pyiqa raises whatever its download or import path raises
                looked_for = _DOWNLOAD.findall(printed.getvalue())
                where = f"; weights looked for at {looked_for[-1]}" if looked_for else ""
                self.unavailable[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}{where}"

    def image_scores(self, image: np.ndarray, reference: np.ndarray | None) -> dict[str, float]:
        """Scores of one (H, W, 3) image in [0, 1]; full-reference ones need `reference`."""
        scores = {}
        if not self.metrics:
            return scores
        tensor = lambda a: self._torch.from_numpy(np.ascontiguousarray(np.transpose(a, (2, 0, 1))[None],
                                                                       np.float32))
        with self._torch.no_grad():
            for name, metric in self.metrics.items():
                if name in NO_REFERENCE:
                    scores[name] = float(metric(tensor(image)))
                elif name in FULL_REFERENCE and reference is not None:
                    scores[name] = float(metric(tensor(image), tensor(reference)))
        return scores

    def set_score(self, name: str, folder, reference_folder) -> float | None:
        """A per-set metric (FID) between two folders of images, if available."""
        if name not in self.metrics:
            return None
        with self._torch.no_grad():
            return float(self.metrics[name](str(folder), str(reference_folder)))
