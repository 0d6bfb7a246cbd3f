"""LoRA-IR behind the method interface (dod_jax.methods): the model (router + IR network with
routed experts), its three training stages, its restore runner.

One structure serves every stage: the experts hang on every convolution of the IR network
from the start (B zero, so the network is the expert-free one), and only stage 2 and the
restore of a stage-2 model select them; the router and stage 1 run without their cost.

Training (configs/lorair.py, LORA_IR.md section 3), on each batch of LQ crops with task labels:
- router: cross-entropy of the router's logits against the task label (the class is the task's
  place in the stage ratio); the router's views of a crop are resized in the graph (bicubic),
  where the authors' data loader resizes with PIL;
- stage1 / stage2: PSNR loss (10 / ln 10) mean_b log(MSE_b + 1e-8) of the IR output on [0, 1]
  images, e_clip and the routing from the frozen router.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from dod_jax import adapters
from dod_jax import checkpoints as ckpt
from dod_jax.errors import ConfigError
from dod_jax.files import file_identity
from dod_jax.methods import Built, Method, TrainingSteps
from dod_jax.methods.lorair.official import EXPERTS
from dod_jax.methods.lorair.router import CLIP_MEAN, CLIP_STD, DGRouter, router_views
from dod_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection
from dod_jax.models.layers import ADAPTERS, DTYPES, FixedKeyRngs, NumpyRngs
from dod_jax.models.nafnet import NAFNetDAM
from dod_jax.optim import accumulate, apply_if_finite, learning_rate, optimizer
from dod_jax.weights.clip import load_clip_vision

STAGES = ("router", "stage1", "stage2")
FINETUNE = ("all", "experts")


class LoRAIR(nnx.Module):
    """The router and the IR network. `__call__(lq, views, use_experts)`: LQ (B, H, W, 3) in
    [0, 1] and the router's views (B, VIEWS, S, S, 3) -> (restored in [0, 1] unclamped, logits)."""

    def __init__(self, router: DGRouter, ir: NAFNetDAM, *, top_k: int):
        self.router, self.ir, self.top_k = router, ir, top_k

    def routed(self, views):
        e_clip, logits = self.router(views)
        return e_clip, logits, adapters.top_k_routing(logits, self.top_k)

    def __call__(self, lq, views, use_experts: bool):
        """The training forward: (restored, router logits), the IR network's blocks scanned."""
        e_clip, logits, routing = self.routed(views)
        with adapters.select(EXPERTS if use_experts else None, routing=routing):
            return self.ir(lq, e_clip, scan=True), logits


ROUTER_HEAD = nnx.All(nnx.Param, nnx.PathContains("router"), nnx.Not(nnx.PathContains("clip_model")))
IR_BASE = nnx.All(nnx.Param, nnx.PathContains("ir"), nnx.Not(nnx.PathContains(ADAPTERS)))
IR_ALL = nnx.All(nnx.Param, nnx.PathContains("ir"))
IR_EXPERTS = nnx.All(nnx.Param, nnx.PathContains("ir"), adapters.adapter_filter(EXPERTS))
ALL_TRAINED = nnx.Any(ROUTER_HEAD, IR_ALL)  # what checkpoints and bundles hold


def stage_filter(stage: str, finetune: str):
    """What `stage` trains: the router's MLP and head; the IR network without experts; in stage
    2 the whole IR network ('all', the code) or the experts alone ('experts', the paper)."""
    if finetune not in FINETUNE:
        raise ConfigError(f"lorair.finetune must be one of {FINETUNE}, got {finetune!r}")
    return {"router": ROUTER_HEAD, "stage1": IR_BASE, "stage2": IR_ALL if finetune == "all" else IR_EXPERTS}[stage]


def build_model(config, tower: CLIPVisionWithProjection, *, dtype: str | None = None) -> LoRAIR:
    """LoRA-IR of `config` around the CLIP `tower`, its IR network computing in `dtype` (default
    train.dtype), the experts injected on every convolution (B zero)."""
    cfg = config.lorair
    rngs = NumpyRngs(config.train.seed + 1)
    router = DGRouter(tower, classes=cfg.classes, embed_dim=cfg.embed_dim, rngs=rngs)
    ir = NAFNetDAM(width=cfg.width, enc_blocks=tuple(cfg.enc_blocks), middle_blocks=cfg.middle_blocks,
                   dec_blocks=tuple(cfg.dec_blocks), embed_dim=cfg.embed_dim, dam_hidden=cfg.dam_hidden,
                   tlc=None if cfg.tlc is None else tuple(cfg.tlc), dtype=DTYPES[dtype or config.train.dtype],
                   rngs=rngs)
    convs = tuple(path for path, _ in adapters.layers(ir))
    adapters.inject(ir, adapters.AdapterSpec(EXPERTS, convs, rank=cfg.rank, alpha=cfg.alpha, experts=cfg.experts),
                    rngs)
    return LoRAIR(router, ir, top_k=cfg.top_k)


def clip_tower(config, *, dtype: str | None = None, shapes_only: bool = False) -> CLIPVisionWithProjection:
    compute = DTYPES[dtype or config.train.dtype]
    stored = DTYPES[config.base.dtype]
    if shapes_only or config.base.random_seed >= 0:
        rngs = FixedKeyRngs() if shapes_only else NumpyRngs(config.base.random_seed)
        return CLIPVisionWithProjection(CLIPVisionConfig.from_transformers(config.clip.to_dict()),
                                        attention_impl=config.base.attention, dtype=compute, param_dtype=stored,
                                        rngs=rngs)
    if not config.base.clip:
        raise ConfigError("the config names no base.clip (a transformers CLIPVisionModelWithProjection folder); "
                          "or set base.random_seed >= 0 for random weights")
    return load_clip_vision(config.base.clip, dtype=compute, param_dtype=stored, attention_impl=config.base.attention)


def training_views(lq01, size: int):
    """The router's views of a batch of crops in the graph: (B, VIEWS, size, size, 3)."""
    b, _, _, c = lq01.shape
    whole = jax.image.resize(lq01, (b, size, size, c), "bicubic")
    large = jax.image.resize(lq01, (b, 2 * size, 2 * size, c), "bicubic")
    tiles = [large[:, y:y + size, x:x + size] for y in (0, size) for x in (0, size)]
    views = jnp.clip(jnp.stack([whole] + tiles, axis=1), 0.0, 1.0)
    return (views - CLIP_MEAN) / CLIP_STD


def psnr_loss(restored, gt):
    """The authors' PSNRLoss: (10 / ln 10) mean over images of log(MSE + 1e-8)."""
    mse = jnp.mean((restored - gt) ** 2, axis=(1, 2, 3))
    return 10.0 / np.log(10.0) * jnp.mean(jnp.log(mse + 1e-8))


class LoRAIRState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    skipped: jax.Array


class LoRAIRSteps(TrainingSteps):
    def __init__(self, stage: str, graphdef, tx, view_size: int, micro_batches: int):
        self.stage, self.graphdef, self.tx = stage, graphdef, tx
        self.view_size, self.micro_batches = view_size, micro_batches

    def loss(self, params, frozen, batch, keys):
        model = nnx.merge(self.graphdef, params, frozen)
        lq, gt = (batch["lq"] + 1.0) / 2.0, (batch["gt"] + 1.0) / 2.0
        views = training_views(lq, self.view_size)
        if self.stage == "router":  # restores nothing: its sample sheets show the LQ crop twice
            _, logits = model.router(views)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["task"]).mean()
            accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["task"])
            return loss, ({"loss": loss, "accuracy": accuracy}, batch["lq"])
        restored, _ = model(lq, jax.lax.stop_gradient(views), use_experts=self.stage == "stage2")
        loss = psnr_loss(restored, gt)
        return loss, ({"loss": loss, "psnr": -loss}, jax.lax.stop_gradient(restored * 2.0 - 1.0))

    def train_step(self, state: LoRAIRState, frozen, batch):
        keys = jnp.zeros((batch["lq"].shape[0],), jnp.uint32)  # the steps draw nothing; accumulate slices by them
        grads, metrics, restored = accumulate(lambda p, b, k: self.loss(p, frozen, b, k), state.params, batch, keys,
                                              self.micro_batches)
        params, opt_state, finite = apply_if_finite(self.tx, grads, metrics["loss"], state.params, state.opt_state)
        metrics["skipped"] = state.skipped + (1 - finite)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             skipped=metrics["skipped"]), metrics, restored

    def trained_params(self, state: LoRAIRState, frozen) -> dict:
        return nnx.to_pure_dict(nnx.state(nnx.merge(self.graphdef, state.params, frozen), ALL_TRAINED))

    def counters(self, state: LoRAIRState) -> dict[str, int]:
        return {"skipped": int(state.skipped)}


class LoRAIRRunner:
    """Per image: the router's views from the unpadded image (PIL, as the authors' test script),
    e_clip and the top-k routing, then the IR network on the padded batch (experts selected for
    a stage-2 model); the output clamped to [0, 1] as theirs."""

    def __init__(self, model: LoRAIR, *, use_experts: bool):
        graphdef, self.state = nnx.split(model)
        self.view_size = model.router.clip_model.vision_tower.config.image_size
        merged = lambda state: nnx.merge(graphdef, state)
        self._route = jax.jit(lambda state, views: merged(state).routed(views)[::2])

        def restore(state, lq, e_clip, routing):
            with adapters.select(EXPERTS if use_experts else None, routing=routing):
                return jnp.clip(merged(state).ir((lq + 1.0) / 2.0, e_clip), 0.0, 1.0) * 2.0 - 1.0

        self._restore = jax.jit(restore)

    def restore_batch(self, lq, prepared: list, engine):
        views = np.stack([router_views(np.uint8(np.clip(np.round(p.rgb * 255.0), 0, 255)), self.view_size)
                          for p in prepared])
        e_clip, routing = engine.compiling(self._route, "router", self.state, jnp.asarray(views))
        return engine.compiling(self._restore, "restore step", self.state, lq, e_clip, routing)


class LoRAIRMethod(Method):
    name = "lorair"
    label = "LoRA-IR"
    stages = STAGES
    base_files = {"clip": "the CLIP vision tower folder (transformers' CLIPVisionModelWithProjection)"}
    trained = ALL_TRAINED

    def base_identity(self, config, root=None) -> dict:
        if config.base.random_seed >= 0:
            return {"random_seed": config.base.random_seed}
        return {"clip": file_identity(config.base.clip, root)}

    def build(self, config, *, dtype: str | None = None) -> Built:
        return Built(build_model(config, clip_tower(config, dtype=dtype), dtype=dtype), {})

    def _steps(self, model: LoRAIR, config):
        tc, stage = config.train, config.train.stage
        if stage not in STAGES:
            raise ConfigError(f"train.stage must be one of {STAGES} for LoRA-IR, got {stage!r}")
        o = config.lorair.optim[stage]
        schedule = learning_rate(o.lr, tc.steps, "cosine", 0, o.final_lr / o.lr)
        tx = optimizer(schedule, o.weight_decay, o.clip, *o.betas)
        graphdef, params, frozen = nnx.split(model, stage_filter(stage, config.lorair.finetune), ...)
        state = LoRAIRState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))
        view_size = model.router.clip_model.vision_tower.config.image_size
        return LoRAIRSteps(stage, graphdef, tx, view_size, tc.micro_batches), state, frozen

    def training(self, config):
        """The stage's model on the config's CLIP; stage 1 starts from the router run in
        train.init_from, stage 2 from the stage-1 run (router and IR network)."""
        model = self.build(config).model
        stage = config.train.stage
        if stage != "router":
            if not config.train.init_from:
                raise ConfigError(f"LoRA-IR's {stage} starts from the {'router' if stage == 'stage1' else 'stage-1'} "
                                  "run: set train.init_from to its checkpoints directory")
            wanted = ROUTER_HEAD if stage == "stage1" else nnx.Any(ROUTER_HEAD, IR_BASE)
            ckpt.load_trained_params(model, config.train.init_from, wanted, ALL_TRAINED)
        return self._steps(model, config)

    def shaped_training(self, config):
        holder = []

        def make():
            steps, state, frozen = self._steps(build_model(config, clip_tower(config, shapes_only=True)), config)
            holder.append(steps)
            return state, frozen

        state, frozen = jax.eval_shape(make)
        return holder[0], state, frozen

    def runner(self, built: Built, config, stage: str, seed: int = 0) -> LoRAIRRunner:
        """A stage-2 model restores with its experts; the router and stage-1 models without."""
        return LoRAIRRunner(built.model, use_experts=stage == "stage2")

    def describe(self, model: LoRAIR, config) -> dict:
        return {"dtype": jnp.dtype(model.ir.intro.dtype).name, "experts": config.lorair.experts,
                "top_k": config.lorair.top_k, "tlc": config.lorair.tlc}


METHOD = LoRAIRMethod()
