"""Model folders loaded once per server and shared by every request.

Each entry holds one Pipeline and a lock: a request takes the lock for its whole generation (two browser tabs
generating at once take turns, and both get their images), and starts from the folder's own scheduler, restored
before the requested one is set, so an image never depends on what the previous request chose.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections import OrderedDict


class LoadedModel:
    """A pipeline, the scheduler it was loaded with, and the lock a request holds while it uses them."""

    def __init__(self, pipe):
        self.pipe, self.lock = pipe, threading.Lock()
        self._scheduler, self._schedule_config = copy.deepcopy(pipe.scheduler), dict(pipe._schedule_config)

    @contextlib.contextmanager
    def use(self, scheduler: str | None):
        """Yields the pipeline, held by this request, with `scheduler` (None: the folder's) set afresh."""
        with self.lock:
            self.pipe.scheduler = copy.deepcopy(self._scheduler)
            self.pipe._schedule_config = dict(self._schedule_config)
            if scheduler:
                self.pipe.set_scheduler(scheduler)
            yield self.pipe


class ModelCache:
    """Pipelines by (folder, LoRA file and scale, device, dtype); the least recently used beyond `size` are
    dropped. `loads` counts the folders actually read from disk."""

    def __init__(self, size: int = 2):
        self.size, self.loads = size, 0
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str, device: str, dtype, lora: str | None = None, lora_scale: float = 1.0) -> LoadedModel:
        """Returns the loaded model, reading the folder (and LoRA file) only the first time they are asked for."""
        from ldm.pipelines.generate import load_pipeline

        if not os.path.isfile(os.path.join(model, "model_index.json")) and not os.path.isfile(model):
            raise FileNotFoundError(f"model folder {model!r} does not exist or has no model_index.json; pass a "
                                    "folder written by `ldm train`, `ldm create-model` or `ldm finetune`, or a "
                                    "single-file checkpoint (.safetensors)")
        lora_key = (os.path.realpath(lora), os.path.getmtime(lora), lora_scale) if lora else None
        key = (os.path.realpath(model), lora_key, device, str(dtype))
        with self._lock:  # one load at a time: two tabs asking for a new folder at once read it once
            if key not in self._models:
                pipe = load_pipeline(model, device, dtype, scheduler=None, lora=lora, lora_scale=lora_scale)
                pipe.set_progress_bar_config(disable=True)
                self._models[key] = LoadedModel(pipe)
                self.loads += 1
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]
