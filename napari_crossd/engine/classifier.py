"""The voxel classifier trained from strokes: a random forest (scikit-learn), saved as plain arrays.

A few strokes give a few thousand correlated voxels and a feature vector of a few hundred
channels; a forest of fully grown trees on random channel subsets fits that without
tuning, is insensitive to each channel's scale, and refits in about a second, which is
what a paint-train-look loop needs (ilastik's choice, and Convpaint's). Saved forests are
node arrays in safetensors, never pickles: loading a model someone sent cannot run code.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier
from sklearn.tree._tree import NODE_DTYPE, Tree

__all__ = ["ForestClassifier"]

# What forests were trained with before their configs saved these settings (they retrain so).
_TRAINED_BEFORE_SAVED = {"max_features": "sqrt", "class_weight": "balanced_subsample"}


class ForestClassifier:
    """A random forest on voxel feature vectors, predicting classes 1..N.

    Args:
        num_classes: N. Classes without strokes get probability 0.
        trees: number of trees; prediction time grows with it (32: about 3 us per voxel on 2
            CPU threads).
        max_depth: depth limit (None: grown until pure); bounds the prediction time.
        max_features: channels tried per split (scikit-learn's meaning). 30 % of them: on the
            strokes suite, with auto-context (and the class weights of that day), it scored
            0.865 / 0.813 Dice near / far on the context tasks against 0.857 / 0.803 for
            sqrt(channels), and ended level after a corrective round
            (benchmarks/strokes/results/README.md).
        class_weight: scikit-learn's ``class_weight``. None (ilastik's choice): every painted
            voxel counts once. On the strokes suite, weighing classes by their strokes
            ("balanced_subsample") tied on the first training, even with five times as much
            background painted, and gained less from corrective strokes, which add to the
            classes that were wrong (benchmarks/strokes/results/README.md).
        seed: the forest's random state.

    Example:
        >>> forest = ForestClassifier(3, trees=8)
        >>> x = np.linspace(0, 1, 20, dtype=np.float32)[:, None]
        >>> p = forest.fit(x, np.where(x[:, 0] < 0.5, 1, 3)).predict_proba(np.array([[0.05], [0.95]]))
        >>> (p.argmax(1) + 1).tolist(), p[:, 1].tolist()  # class 2 has no strokes: probability 0
        ([1, 3], [0.0, 0.0])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        trees: int = 32,
        max_depth: int | None = None,
        max_features=0.3,
        class_weight: str | None = None,
        seed: int = 0,
    ) -> None:
        self.num_classes = int(num_classes)
        self.trees = int(trees)
        self.max_depth = max_depth
        self.max_features = max_features
        self.class_weight = class_weight
        self.seed = int(seed)
        self.forest: RandomForestClassifier | None = None

    @property
    def fitted(self) -> bool:
        return self.forest is not None

    def config(self) -> dict:
        return {"kind": "random forest", "trees": self.trees, "max_depth": self.max_depth,
                "max_features": self.max_features, "class_weight": self.class_weight, "seed": self.seed}

    def unfitted(self, seed: int | None = None) -> ForestClassifier:
        """A new, untrained classifier with these settings (and ``seed``, if given)."""
        return ForestClassifier(self.num_classes, trees=self.trees, max_depth=self.max_depth,
                                max_features=self.max_features, class_weight=self.class_weight,
                                seed=self.seed if seed is None else seed)

    def _new_forest(self) -> RandomForestClassifier:
        return RandomForestClassifier(
            n_estimators=self.trees,
            max_depth=self.max_depth,
            max_features=self.max_features,
            class_weight=self.class_weight,
            n_jobs=torch.get_num_threads(),
            random_state=self.seed,
        )

    def fit(self, features: np.ndarray, classes: np.ndarray) -> ForestClassifier:
        """Train on feature vectors ``(P, C)`` with classes ``(P,)`` in 1..N."""
        features, classes = np.asarray(features, dtype=np.float32), np.asarray(classes)
        if features.ndim != 2 or classes.shape != features.shape[:1]:
            raise ValueError(f"Expected features (P, C) and classes (P,), got {features.shape} and {classes.shape}.")
        if classes.min() < 1 or classes.max() > self.num_classes:
            raise ValueError(f"Classes must be 1..{self.num_classes}, got {classes.min()}..{classes.max()}.")
        self.forest = self._new_forest().fit(features, classes)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities ``(P, N)`` float32 of classes 1..N for feature vectors ``(P, C)``."""
        if self.forest is None:
            raise ValueError("The classifier is untrained: fine-tune it on painted labels first.")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.forest.n_features_in_:
            raise ValueError(
                f"Expected features (P, {self.forest.n_features_in_}), got shape {features.shape}: "
                "were they computed with the same feature spec?"
            )
        self.forest.n_jobs = torch.get_num_threads()  # where it runs now (a cluster worker), not where it was fit
        out = np.zeros((len(features), self.num_classes), dtype=np.float32)
        out[:, self.forest.classes_ - 1] = self.forest.predict_proba(features)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The fitted trees as arrays (for safetensors): node fields and leaf values, concatenated."""
        if self.forest is None:
            raise ValueError("Nothing to save: the classifier is untrained.")
        trees = [estimator.tree_.__getstate__() for estimator in self.forest.estimators_]
        state = {name: np.concatenate([t["nodes"][name] for t in trees]) for name in NODE_DTYPE.names}
        state["values"] = np.concatenate([t["values"][:, 0, :] for t in trees]).astype(np.float64)
        state["node_counts"] = np.array([t["node_count"] for t in trees], dtype=np.int64)
        state["max_depths"] = np.array([t["max_depth"] for t in trees], dtype=np.int64)
        state["classes"] = self.forest.classes_.astype(np.int64)
        state["num_features"] = np.array([self.forest.n_features_in_], dtype=np.int64)
        return state

    @classmethod
    def from_state(cls, num_classes: int, config: dict, state: dict[str, np.ndarray]) -> ForestClassifier:
        """Rebuild what :meth:`state` saved (with this scikit-learn's tree classes)."""
        missing = sorted(set(NODE_DTYPE.names) - set(state))
        if missing:
            raise ValueError(
                f"The saved forest lacks the node fields {missing} of this scikit-learn ({NODE_DTYPE.names}): "
                "it was saved by an incompatible version; retrain it from the strokes."
            )
        later = {key: config.get(key, value) for key, value in _TRAINED_BEFORE_SAVED.items()}
        classifier = cls(num_classes, trees=config["trees"], max_depth=config["max_depth"], seed=config["seed"],
                         **later)
        classes, n_features = state["classes"], int(state["num_features"][0])
        forest = classifier._new_forest()
        forest.estimators_ = []
        ends = np.cumsum(state["node_counts"])
        for end, count, depth in zip(ends, state["node_counts"], state["max_depths"], strict=True):
            nodes = np.zeros(int(count), dtype=NODE_DTYPE)
            for name in NODE_DTYPE.names:
                nodes[name] = state[name][end - count : end]
            tree = Tree(n_features, np.array([len(classes)], dtype=np.intp), 1)
            values = np.ascontiguousarray(state["values"][end - count : end, None, :])
            tree.__setstate__({"max_depth": int(depth), "node_count": int(count), "nodes": nodes, "values": values})
            estimator = DecisionTreeClassifier()
            estimator.tree_, estimator.classes_, estimator.n_classes_ = tree, classes, len(classes)
            estimator.n_outputs_, estimator.n_features_in_, estimator.max_features_ = 1, n_features, n_features
            forest.estimators_.append(estimator)
        forest.estimator_ = DecisionTreeClassifier()
        forest.classes_, forest.n_classes_, forest.n_outputs_ = classes, len(classes), 1
        forest.n_features_in_ = n_features
        classifier.forest = forest
        return classifier
