import numpy as np

import privml.config as c
import privml.data as d
from privml.data import partition
from privml.data.federation import SiteData
from privml.fl.engine import simulate
from privml.models.nets import ModelSpec

res = {}
for ds in range(5):
    cfg = c.load_config(None)
    cfg.data.seed = ds
    fd = d.load_federation(cfg)
    # validation carved from each site's training records; the test split is not touched
    sites = []
    for i, s in enumerate(fd.sites):
        tr, va = partition.train_test_split(s.y_train, 0.25, rng=np.random.default_rng([99, i]))
        sites.append(SiteData(s.name, s.X_train[tr], s.y_train[tr], s.X_train[va], s.y_train[va]))
    fd.sites = sites
    spec = ModelSpec("logistic", fd.n_features, 1)
    for lr in [0.5, 1, 2, 4, 8]:
        for ep in [1, 2, 5, 10]:
            t = cfg.training.model_copy(update=dict(lr=lr, local_epochs=ep))
            r = simulate(fd, spec, t)
            res.setdefault((lr, ep), []).append((r.metrics["accuracy"], r.metrics["loss"]))
for k, v in sorted(
    res.items(), key=lambda kv: (-np.mean([a for a, _ in kv[1]]), np.mean([lo for _, lo in kv[1]]))
):
    print(k, round(np.mean([a for a, _ in v]), 4), round(np.mean([lo for _, lo in v]), 4))

# One-standard-error rule: the cheapest setting (fewest local epochs, then smallest lr) whose
# validation accuracy is within one standard error of the best.
n_val = sum(len(s.y_test) for s in fd.sites) * 5
best = max(np.mean([a for a, _ in v]) for v in res.values())
se = np.sqrt(best * (1 - best) / n_val)
ok = [k for k, v in res.items() if np.mean([a for a, _ in v]) >= best - se]
choice = min(ok, key=lambda k: (k[1], np.mean([lo for _, lo in res[k]])))
print(f"best {best:.4f}, SE {se:.4f}: choose lr={choice[0]}, local_epochs={choice[1]}")
