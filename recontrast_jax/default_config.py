"""The base ReContrast configuration: every field declared and commented.

Config files in `configs/` import `get_config()` from here and override a few
fields, so a field means the same thing everywhere.
"""

from __future__ import annotations

import ml_collections

from recontrast_jax.data import categories

# ReContrast's MVTec script keeps the encoder BatchNorm in eval mode for these.
MVTEC_ENCODER_BN_EVAL = ("toothbrush", "leather", "grid", "tile", "wood", "screw")
# ... and its VisA script for these.
VISA_ENCODER_BN_EVAL = ("cashew", "pcb1")


def get_config() -> ml_collections.ConfigDict:
    """The paper's MVTec AD protocol (spec section 3.1) on a user folder."""
    config = ml_collections.ConfigDict()
    # 'recontrast'; 'patchcore' (memory bank, no training); 'reconpatch' (memory
    # bank of patch features modulated by a contrastively trained linear layer).
    config.method = "recontrast"
    # train: train (resuming) and evaluate; evaluate: evaluate a checkpoint;
    # predict: score the images of predict.input; export: write an inference artifact.
    config.mode = "train"
    config.seed = 111  # setup_seed(111) at the start of every category

    config.data = ml_collections.ConfigDict()
    # 'folder' (MVTec layout), 'medical_folder' (train/NORMAL, test/<CLASS>),
    # 'tfds' (a builder of recontrast_jax.data) or 'embedded'; see data/sources.py.
    config.data.source = "folder"
    config.data.root = ""  # dataset folder; for 'embedded', '' uses the cache dir
    config.data.categories = ()  # () = every category the source has
    config.data.tfds_name = ""  # for 'tfds': mvtec_ad, visa, aptos2019, oct2017, ...
    config.data.tfds_data_dir = ""  # for 'tfds': TFDS data dir ('' = TFDS default)
    config.data.tfds_manual_dir = ""  # for 'tfds': downloaded archives, to prepare
    config.data.image_size = 256  # resize side, PIL bilinear with antialias
    config.data.crop_size = 256  # CenterCrop after resizing
    # 'squash': Resize((s, s)) (ReContrast's scripts); 'shorter_side':
    # Resize(s), the shorter side to s with the aspect ratio kept (PatchCore's).
    config.data.resize = "squash"
    # Ground truth after resizing: 'positive' = any pixel > 0 is anomalous and
    # the image label is the mask's max (ReContrast); 'exactly_one' = only
    # pixels still 255 count and the label is the folder's (PatchCore).
    config.data.mask_rule = "positive"
    config.data.cache = True  # keep decoded training images in memory
    # Normal training images held out (never trained on) to calibrate thresholds.
    # The paper configs set 0 (the paper trains on all of them); thresholds then
    # come from the training images themselves and say so.
    config.data.holdout_fraction = 0.1
    # One model for all categories (the multi-class / unified protocol): trained
    # on their training images together, evaluated per category.
    config.data.multiclass = False

    config.model = ml_collections.ConfigDict()
    # resnet18/34/50, wide_resnet50_2/101_2, resnext101_32x8d, densenet201,
    # efficientnet_lite0 (the quickstarts), or a tiny test variant.
    config.model.arch = "wide_resnet50_2"
    # Encoder weights: 'imagenet' = torchvision IMAGENET1K_V1 (downloaded from the
    # Hugging Face Hub and cached; efficientnet_lite0's come with an installed
    # package, no download), a file path (.safetensors/.pth/.npz/.msgpack), or
    # '' for random initialisation.
    config.model.pretrained = "imagenet"
    # Compute dtype: 'bfloat16' for GPUs/TPUs (parameters, BatchNorm statistics,
    # losses and updates stay float32); 'float32' reproduces the paper.
    config.model.dtype = "float32"
    config.model.encoder_bn_train = True  # E's BatchNorm in train mode...
    config.model.encoder_bn_eval_categories = ()  # ...except for these categories
    # Decoder activation: 'relu', or 'gelu' (exact erf; the multi-class scripts).
    config.model.decoder_activation = "relu"
    # PartialNorm in the trainable encoder (the stable scripts): > 0 is the
    # variance threshold (5e-4); 0 keeps BatchNorm.
    config.model.partial_norm_threshold = 0.0
    config.model.encoder_bn_epsilon = 1e-5  # E's BatchNorm eps (stable: 1e-6)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr_decoder = 2e-3  # bottleneck + decoder (AdamW group 1)
    config.optimizer.lr_encoder = 1e-5  # trainable encoder (AdamW group 2)
    config.optimizer.weight_decay = 1e-5  # decoupled, on every parameter
    config.optimizer.beta1 = 0.9
    config.optimizer.beta2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.amsgrad = False  # PyTorch's AMSGrad (multi-class scripts)
    # MultiStepLR: both groups' rates times lr_gamma at each of these updates.
    config.optimizer.lr_milestones = ()
    config.optimizer.lr_gamma = 0.2
    # Stable scripts: the bottleneck + decoder group's state restarts every N
    # updates (0: never), and the encoder group then pauses for M updates.
    config.optimizer.reset_decoder_every = 0
    config.optimizer.encoder_pause_after_reset = 0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 2000  # T, iterations per category
    config.train.batch_size = 16  # global batch over all devices
    config.train.drop_last = False  # the reference keeps partial last batches
    config.train.alpha_warmup_fraction = 0.1  # alpha: -3 -> 1 over this part of T
    config.train.mining_factor = 0.0  # gradient factor of easy points
    config.train.log_every = 50  # steps between loss/throughput logs
    # The frozen encoder's features of the (never augmented) training images are
    # constant: 'auto' computes them once when they fit in frozen_cache_mb per
    # device, 'on'/'off' force it. Results are the same either way.
    config.train.frozen_cache = "auto"
    config.train.frozen_cache_mb = 4096

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 250  # evaluate (and checkpoint) every N steps and at T
    config.eval.batch_size = 16  # padded to a multiple of the device count
    config.eval.sigma = 4.0  # Gaussian blur of the anomaly map
    config.eval.score_rule = "max"  # image score: 'max' or 'mean' of the map
    config.eval.max_ratio = 0.0  # >0: mean of the top ratio*H*W pixels
    config.eval.pixel_metrics = True  # pixel AUROC/AUPRO need ground-truth masks
    # ReContrast's map: 'sum' of the six cosine maps, scipy Gaussian (spec 4.1);
    # 'mean_conv5': their mean and a 5x5 zero-padded Gaussian conv (spec 4.3).
    config.eval.map_rule = "sum"
    # ReContrast: > 0 replaces the map's outer `border` pixels by the nearest
    # inner ones before the blur (zero padding makes the edges of small images
    # hot on normal images too); 0, the papers' setting, keeps them.
    config.eval.border = 0

    # PatchCore (config.method = 'patchcore'); spec reconpatch.md section 1.
    config.patchcore = ml_collections.ConfigDict()
    config.patchcore.pretrain_dim = 1024  # per-layer MeanMapper dimension
    config.patchcore.target_dim = 1024  # Aggregator output (patch feature) dimension
    config.patchcore.coreset_ratio = 0.01  # approximate greedy coreset fraction
    config.patchcore.reweight_neighbors = 1  # >1: Eq. 10 reweighting with b neighbours
    config.patchcore.reweight_per_patch = False  # reweight every patch, not the max
    # Patch score: 'euclidean' (the papers' D), or 'squared' L2, what the
    # PatchCore reference's faiss IndexFlatL2 returns (scores and maps from d^2).
    config.patchcore.distance = "euclidean"
    # PatchCore.load()'s side effect (spec reconpatch.md section 1.2): one
    # train-mode forward of a raw all-ones crop through the backbone updates
    # every BatchNorm's running statistics (momentum 0.1) before features are
    # taken. Every published PatchCore number was produced with it.
    config.patchcore.bn_stats_forward = False
    # Ensemble: several backbones (e.g. ('wide_resnet101_2', 'resnext101_32x8d',
    # 'densenet201')); () = the single config.model.arch. Each model's scores
    # and maps are modified-z-scored with the median and MAD of its own scores
    # on the training images, then averaged (spec reconpatch.md section 2.6).
    config.patchcore.ensemble = ()
    config.patchcore.knn_memory_mb = 256  # budget of one kNN distance block

    # ReConPatch (config.method = 'reconpatch'); spec reconpatch.md section 2.
    # Fields marked "assumed" are not stated in the paper; the default is the
    # spec's recommendation.
    config.reconpatch = ml_collections.ConfigDict()
    config.reconpatch.feature_dim = 512  # f output (512 WRN-50; 384 per ensemble model)
    config.reconpatch.projection_dim = 128  # g output (assumed)
    config.reconpatch.epochs = 120  # per category (60 for the ensemble)
    config.reconpatch.batch_size = 1024  # patches per step, global (assumed)
    config.reconpatch.lr = 1e-5  # AdamP, cosine-annealed per epoch (1e-6 ensemble)
    config.reconpatch.weight_decay = 1e-2
    config.reconpatch.eps = 1e-8  # AdamP epsilon (AdamP default)
    config.reconpatch.ema = 0.999  # gamma of the EMA target f, g (assumed)
    config.reconpatch.alpha = 0.5  # pairwise vs contextual label weight (assumed)
    config.reconpatch.sigma = 1.0  # pairwise Gaussian bandwidth (assumed)
    # L2-normalise the EMA projections for the pairwise term (assumed; raw
    # 128-d projections give exp(-d^2) ~ 0 for almost every pair).
    config.reconpatch.normalize_pairwise = True
    config.reconpatch.k = 5  # contextual neighbourhood size, self included (assumed)
    config.reconpatch.margin = 1.0  # relaxed contrastive margin (assumed)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 250  # steps between checkpoints (and one at the end)
    config.checkpoint.max_to_keep = 2  # the newest k, so the final one is kept
    config.checkpoint.step = -1  # evaluate/predict/export: this step (-1 = latest)

    config.threshold = ml_collections.ConfigDict()
    # quantile | mean_std | fixed | f1_optimal_on_test (see thresholds.py)
    config.threshold.rule = "quantile"
    config.threshold.quantile = 0.99  # for 'quantile'
    config.threshold.k = 3.0  # for 'mean_std'
    config.threshold.image_value = 1.0  # for 'fixed'
    config.threshold.pixel_value = 1.0  # for 'fixed'

    config.predict = ml_collections.ConfigDict()
    config.predict.input = ""  # folder of images to score (searched recursively)
    config.predict.output = ""  # default: <workdir>/predictions/<category>
    config.predict.num_heatmaps = 1000  # overlays written (most anomalous first)
    # jax: the checkpoint in process; onnxruntime | openvino: the export's
    # model.onnx (run --config.mode=export first; extras of the same names).
    config.predict.runtime = "jax"
    config.predict.precision = "float32"  # bfloat16: OpenVINO on AVX-512 BF16/AMX

    config.export = ml_collections.ConfigDict()
    config.export.directory = ""  # default: <workdir>/export/<category>
    config.export.onnx = True  # also model.onnx (needs the 'onnx' extra)

    config.report = ml_collections.ConfigDict()
    config.report.title = "ReContrast"
    config.report.num_heatmaps = 8  # heatmap panels written per category
    return config


def medical_config(name: str) -> ml_collections.ConfigDict:
    """Shared settings of the medical scripts (APTOS, OCT2017, ISIC2018).

    A `train/NORMAL`, `test/<CLASS>` folder, batch 32, 1000 iterations, image
    score = max of the map, image-level metrics only (AUROC; F1 and accuracy at
    the F1-optimal threshold, chosen on the test set as the reference does).
    """
    config = get_config()
    config.data.source = "medical_folder"
    config.data.categories = (name,)
    config.train.steps = 1000
    config.train.batch_size = 32
    config.eval.batch_size = 32
    config.eval.pixel_metrics = False
    config.data.holdout_fraction = 0.0  # the paper trains on every normal image
    return config


def benchmark_config(
    tfds_name: str, names: tuple[str, ...], category: str, kind: str
) -> ml_collections.ConfigDict:
    """A benchmark in a folder: `category` is one of `names` or 'all'.

    The folder source (`--config.data.source=tfds` uses the `tfds_name`
    builder), the V1 ImageNet weights, and every normal image used for
    training as in the papers (thresholds then come from training images).
    """
    if category != "all" and category not in names:
        raise ValueError(f"Unknown {kind} {category!r}; use one of {names} or 'all'.")
    config = get_config()
    config.data.source = "folder"
    config.data.tfds_name = tfds_name
    config.data.categories = names if category == "all" else (category,)
    config.data.holdout_fraction = 0.0
    config.model.pretrained = "imagenet"
    return config


def mvtec_config(category: str) -> ml_collections.ConfigDict:
    """The base of every MVTec AD config (`benchmark_config`)."""
    return benchmark_config(
        "mvtec_ad", categories.MVTEC_CATEGORIES, category, "MVTec category"
    )


def visa_config(category: str) -> ml_collections.ConfigDict:
    """The base of every VisA config: the prepared 1cls folder or `visa` builder."""
    return benchmark_config("visa", categories.VISA_OBJECTS, category, "VisA object")


def use_patchcore_reference_pipeline(config: ml_collections.ConfigDict) -> None:
    """PatchCore's reference data and feature rules (spec reconpatch.md 1.1-1.2).

    `Resize(s)` with the aspect ratio kept, masks counted where exactly 1 after
    resizing (image labels from the folders), and the BatchNorm statistics
    moved by `PatchCore.load()`'s all-ones forward. The nearest-neighbour
    distance (`patchcore.distance`) is set by each config.
    """
    config.data.resize = "shorter_side"
    config.data.mask_rule = "exactly_one"
    config.patchcore.bn_stats_forward = True


def use_stable_protocol(
    config: ml_collections.ConfigDict,
    steps: int,
    encoder_pause: int,
    max_ratio: float,
) -> ml_collections.ConfigDict:
    """The stable scripts' training and evaluation (spec section 3.4).

    PartialNorm (threshold 5e-4, eps 1e-6) in the trainable encoder, always in
    train mode; AdamW eps 1e-10 whose bottleneck + decoder state restarts every
    500 updates, the encoder paused `encoder_pause` updates after each restart;
    alpha warm-up over 0.2 T, `drop_last`, an evaluation every 500 updates
    scored with `max_ratio` (0: the max).
    """
    config.model.partial_norm_threshold = 5e-4
    config.model.encoder_bn_epsilon = 1e-6
    config.model.encoder_bn_train = True
    config.model.encoder_bn_eval_categories = ()
    config.optimizer.eps = 1e-10
    config.optimizer.reset_decoder_every = 500
    config.optimizer.encoder_pause_after_reset = encoder_pause
    config.train.steps = steps
    config.train.batch_size = 16
    config.train.drop_last = True
    config.train.alpha_warmup_fraction = 0.2
    config.eval.every = 500
    config.eval.score_rule = "max"
    config.eval.max_ratio = max_ratio
    config.checkpoint.every = 500
    return config


def use_multiclass_protocol(
    config: ml_collections.ConfigDict, steps: int = 5000
) -> ml_collections.ConfigDict:
    """The multi-class scripts' training and evaluation (spec sections 3.3, 4.3).

    One model on every category's images (seed 1, `drop_last`), GELU decoder,
    encoder BatchNorm in eval mode, AdamW eps 1e-10 with PyTorch's AMSGrad and
    MultiStepLR x0.2 at 0.8 T, evaluated every 1000 iterations on the mean of
    the six maps blurred by the 5x5 conv, image score = mean of the top 1%.
    """
    config.data.multiclass = True
    config.seed = 1
    config.model.decoder_activation = "gelu"
    config.model.encoder_bn_train = False
    config.model.encoder_bn_eval_categories = ()
    config.optimizer.eps = 1e-10
    config.optimizer.amsgrad = True
    config.optimizer.lr_milestones = (int(0.8 * steps),)
    config.optimizer.lr_gamma = 0.2
    config.train.steps = steps
    config.train.batch_size = 16
    config.train.drop_last = True
    config.train.alpha_warmup_fraction = 0.1
    config.eval.every = 1000
    config.eval.batch_size = 16
    config.eval.map_rule = "mean_conv5"
    config.eval.score_rule = "max"
    config.eval.max_ratio = 0.01
    config.checkpoint.every = 1000
    return config


def btad_config(product: str) -> ml_collections.ConfigDict:
    """The base of the BTAD configs: `product` is '01', '02', '03' or 'all'.

    `benchmark_config` with PatchCore's reference data and feature rules.
    """
    config = benchmark_config("btad", categories.BTAD_PRODUCTS, product, "BTAD product")
    use_patchcore_reference_pipeline(config)
    return config


def embedded_memory_bank_config(method: str) -> ml_collections.ConfigDict:
    """PatchCore/ReConPatch quickstart base: embedded data, ImageNet Lite0 at 128 px.

    The patch features are Lite0's stride-8 and stride-16 maps (40 and 112
    channels), the mid-level layers PatchCore takes from WideResNet-50.
    """
    config = get_config()
    config.method = method
    config.data.source = "embedded"
    config.data.categories = ("brick", "grass", "gravel")
    config.data.image_size = 128
    config.data.crop_size = 128
    config.model.arch = "efficientnet_lite0"
    config.model.pretrained = "imagenet"  # shipped in a package: no download
    config.patchcore.pretrain_dim = 256
    config.patchcore.target_dim = 256
    config.patchcore.coreset_ratio = 0.1
    config.eval.batch_size = 16
    return config


RESIZE_MODES = ("squash", "shorter_side")  # data.resize, see data/input_pipeline.py
MASK_RULES = ("positive", "exactly_one")  # data.mask_rule
MODES = ("train", "evaluate", "predict", "export")
