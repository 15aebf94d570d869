"""Named training recipes: each sets optimizer, schedule, regularisation and length together.

trainer/main.py applies a recipe's values to every Config field whose flag the user did
not set, so each part stays overridable by its own flag.
"""

# He et al. (2015) Sec. 4.2, in iterations of a global batch of 128: learning rate 0.1,
# divided by 10 at 32k and 48k iterations, stop at 64k; ResNet-110 and deeper warm up at
# 0.01 for about 400 iterations (the paper: "until the training error is below 80%").
HE2016_ITERATIONS = 64_000
HE2016_BOUNDARIES = (32_000, 48_000)
HE2016_WARMUP_ITERATIONS = 400
HE2016_WARMUP_LEARNING_RATE = 0.01
HE2016_WARMUP_MIN_DEPTH = 110

RECIPES = {
    # A modern short schedule: linear warm-up then cosine decay, Nesterov momentum,
    # label smoothing, decay on kernels only, batch-norm momentum for short runs. Decay
    # 1e-3: measured best of 1e-4/5e-4/1e-3 for ResNet-20 in 30 epochs (RESULTS.md).
    "fast": dict(epochs=30, learning_rate=0.1, lr_schedule="cosine", warmup_epochs=2.0,
                 momentum=0.9, nesterov=True, weight_decay=1e-3, label_smoothing=0.1,
                 bn_momentum=0.9, clipnorm=None),
    # The paper as written; epochs=None means its 64k iterations.
    "he2016": dict(epochs=None, learning_rate=0.1, lr_schedule="he2016", warmup_epochs=0.0,
                   momentum=0.9, nesterov=False, weight_decay=1e-4, label_smoothing=0.0,
                   bn_momentum=0.9, clipnorm=None),
    # The origin blog post: Keras SGD at lr 0.01, clipnorm 1.0, 20 epochs, Keras defaults otherwise.
    "blog": dict(epochs=20, learning_rate=0.01, lr_schedule="constant", warmup_epochs=0.0,
                 momentum=0.0, nesterov=False, weight_decay=0.0, label_smoothing=0.0,
                 bn_momentum=0.99, clipnorm=1.0),
}
