"""``ALSModel``: the fitted factors, with the API and on-disk format of Spark's ``ALSModel``.

Every estimator of this package (``ALS``, ``MascotMF``, ``PrunedMF``) produces this model.

Two hooks into pyspark, both installed when this module is imported:

* ``ALSModel`` is registered as a virtual subclass of ``pyspark.ml.recommendation.ALSModel``
  (``ABCMeta.register``, the extension point pyspark's ``Params`` classes have): code that checks
  ``isinstance(stage, ALSModel)`` with pyspark's class accepts ours, and no pyspark method is
  inherited. A real subclass would inherit ``JavaModel``'s machinery: pyspark would then save a
  pipeline holding it through the JVM (``_to_java``), where our class is lost.
* pyspark loads every stage of a saved ``PipelineModel`` / ``CrossValidatorModel`` /
  ``TrainValidationSplitModel`` with ``DefaultParamsReader.loadParamsInstance``, which maps the
  metadata class ``org.apache.spark.ml.recommendation.ALSModel`` to pyspark's ``ALSModel``. That
  class must stay Spark's (Spark's loaders accept nothing else), so our saves add a
  ``pythonClass`` key that they ignore, and ``loadParamsInstance`` is wrapped to give back the
  class named there. It changes nothing for directories without the key, nor for
  ``pyspark.ml.recommendation.ALSModel.load``, which still returns pyspark's class; it costs one
  more read of each nested stage's one-line metadata.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Optional

from pyspark import StorageLevel
from pyspark.ml import Model
from pyspark.ml.recommendation import ALSModel as SparkALSModel
from pyspark.ml.recommendation import _ALSModelParams
from pyspark.ml.util import DefaultParamsReader, MLReadable, MLReader, MLWritable, MLWriter
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf import conf
from spark_gpu_mf.backends.solve_config import SolveConfig
from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.params import validate_params
from spark_gpu_mf.spark import persistence
from spark_gpu_mf.spark.fold_in import fold_in
from spark_gpu_mf.spark.id_index import (
    build_index,
    to_internal,
    to_original,
    to_original_recommendations,
)
from spark_gpu_mf.spark.recommend import recommend_for_all
from spark_gpu_mf.summary import TrainingSummary
from spark_gpu_mf.validation import (
    check_indexable,
    check_numeric_column,
    checked_id,
    checked_rating,
    non_null_id,
    validated_ratings,
)

if TYPE_CHECKING:
    from pyspark.ml._typing import ParamMap

__all__ = ["ALSModel"]

COLD_START_STRATEGIES = ("nan", "drop")
# What a fitted model keeps of its fit for fold-in (saved in the metadata as TRAINING_KEY).
TRAINING_SETTINGS = ("regParam", "implicitPrefs", "alpha", "nonnegative")

MODEL_PARAM_RULES = {
    "coldStartStrategy": lambda v: str(v).lower() in COLD_START_STRATEGIES,
    "blockSize": lambda v: v > 0,
}


def _predict(user_features, item_features):
    """Spark's float dot product (accumulated in float, in feature order), NaN for unknown ids."""
    dot = F.aggregate(
        F.zip_with(user_features, item_features, lambda a, b: a * b),
        F.lit(0.0).cast(T.FloatType()),
        lambda total, x: total + x,
    )
    nan = F.lit(float("nan")).cast(T.FloatType())
    missing = user_features.isNull() | item_features.isNull()
    return F.coalesce(F.when(missing, nan).otherwise(dot), nan)


class ALSModel(Model, _ALSModelParams, MLWritable, MLReadable["ALSModel"]):
    """Model fitted by ``ALS`` (or ``MascotMF`` / ``PrunedMF``): user and item factors.

    Drop-in for ``pyspark.ml.recommendation.ALSModel``: the same params, ``transform`` output,
    ``recommendFor*`` results and saved layout (each loads the other's saved models).

    Examples
    --------
    >>> model = ALS(rank=10, seed=0, maxIter=5).fit(df)   # doctest: +SKIP
    >>> model.recommendForAllUsers(3)                      # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(userCol="user", itemCol="item", coldStartStrategy="nan")
        self._rank: int = 0
        self._user_factors: Optional[DataFrame] = None
        self._item_factors: Optional[DataFrame] = None
        self._summary: Optional[TrainingSummary] = None
        self._recommend_candidates: dict = {}  # see spark.recommend._broadcast_candidates
        # The fit's regParam, implicitPrefs, alpha, nonnegative and ratingCol, for fold-in;
        # empty for a model saved by Spark (fold-in then asks for them).
        self._training: Dict[str, Any] = {}
        # ALS(indexIds=True): per side, (key <original id type>, index int) when that side's
        # ids were long or string; the factor DataFrames above then hold the int index.
        self._user_index: Optional[DataFrame] = None
        self._item_index: Optional[DataFrame] = None

    @classmethod
    def _create(
        cls,
        rank: int,
        user_factors: DataFrame,
        item_factors: DataFrame,
        uid: Optional[str] = None,
        summary: Optional[TrainingSummary] = None,
        training: Optional[Dict[str, Any]] = None,
        user_index: Optional[DataFrame] = None,
        item_index: Optional[DataFrame] = None,
    ) -> "ALSModel":
        """A model over existing factor DataFrames ``(id int, features array<float>)``;
        ``training``: the fit's settings fold-in reuses (``TRAINING_SETTINGS``);
        ``user_index``/``item_index``: ``(key, index int)`` of a side whose ids the factors
        hold as an int index (``ALS(indexIds=True)``)."""
        model = cls()
        if uid is not None:
            model._resetUid(uid)
        model._rank = int(rank)
        model._user_factors = user_factors
        model._item_factors = item_factors
        model._summary = summary
        model._training = dict(training or {})
        model._user_index = user_index
        model._item_index = item_index
        return model

    @property
    def _indexed(self) -> bool:
        return self._user_index is not None or self._item_index is not None

    # ------------------------------------------------------------------ attributes
    @property
    def rank(self) -> int:
        """rank of the matrix factorization model"""
        return self._rank

    @property
    def userFactors(self) -> DataFrame:
        """a DataFrame that stores user factors in two columns: `id` and `features`"""
        return to_original(self._user_factors, self._user_index)

    @property
    def itemFactors(self) -> DataFrame:
        """a DataFrame that stores item factors in two columns: `id` and `features`"""
        return to_original(self._item_factors, self._item_index)

    @property
    def hasSummary(self) -> bool:
        """Whether a training summary exists (only right after fit; it is not saved)."""
        return self._summary is not None

    @property
    def summary(self) -> TrainingSummary:
        """Per-iteration training record of the fit that produced this model."""
        if self._summary is None:
            raise RuntimeError(
                f"No training summary available for this {type(self).__name__}: summaries exist "
                "only on freshly fitted models, not loaded ones."
            )
        return self._summary

    # ------------------------------------------------------------------ setters
    def setUserCol(self, value: str) -> "ALSModel":
        """Sets the value of :py:attr:`userCol`."""
        return self._set(userCol=value)

    def setItemCol(self, value: str) -> "ALSModel":
        """Sets the value of :py:attr:`itemCol`."""
        return self._set(itemCol=value)

    def setColdStartStrategy(self, value: str) -> "ALSModel":
        """Sets the value of :py:attr:`coldStartStrategy`."""
        return self._set(coldStartStrategy=value)

    def setPredictionCol(self, value: str) -> "ALSModel":
        """Sets the value of :py:attr:`predictionCol`."""
        return self._set(predictionCol=value)

    def setBlockSize(self, value: int) -> "ALSModel":
        """Sets the value of :py:attr:`blockSize`."""
        return self._set(blockSize=value)

    # ------------------------------------------------------------------ transform
    def _spark(self) -> SparkSession:
        return self._user_factors.sparkSession

    def transformSchema(self, schema: T.StructType) -> T.StructType:
        """Spark's ``ALSModel.transformSchema``: numeric id columns (integral or string for an
        indexed side), a new float prediction."""
        for column, index in ((self.getUserCol(), self._user_index),
                              (self.getItemCol(), self._item_index)):  # fmt: skip
            (check_numeric_column if index is None else check_indexable)(schema, column)
        prediction = self.getPredictionCol()
        if prediction in schema.names:
            raise illegal_argument(f"requirement failed: Column {prediction} already exists.")
        return T.StructType(schema.fields + [T.StructField(prediction, T.FloatType(), False)])

    def _transform(self, dataset: DataFrame) -> DataFrame:
        validate_params(self, MODEL_PARAM_RULES)
        self.transformSchema(dataset.schema)
        user_col, item_col = self.getUserCol(), self.getItemCol()
        validated = dataset.withColumns(
            {
                column: (checked_id if index is None else non_null_id)(dataset, column)
                for column, index in ((user_col, self._user_index), (item_col, self._item_index))
            }
        )
        tag = self.uid.replace("-", "_")
        user_id, user_features = f"__als_user_id_{tag}", f"__als_user_features_{tag}"
        item_id, item_features = f"__als_item_id_{tag}", f"__als_item_features_{tag}"
        users = self.userFactors.select(
            F.col("id").alias(user_id), F.col("features").alias(user_features)
        )
        items = self.itemFactors.select(
            F.col("id").alias(item_id), F.col("features").alias(item_features)
        )
        joined = validated.join(users, validated[user_col] == users[user_id], "left").join(
            items, validated[item_col] == items[item_id], "left"
        )
        predictions = joined.select(
            *[validated[c] for c in validated.columns],
            _predict(F.col(user_features), F.col(item_features)).alias(self.getPredictionCol()),
        )
        if self.getColdStartStrategy().lower() == "drop":
            return predictions.na.drop("all", subset=[self.getPredictionCol()])
        return predictions

    # ------------------------------------------------------------------ recommendations
    def _recommend(self, src: DataFrame, dst: DataFrame, src_col: str, dst_col: str, num: int):
        validate_params(self, MODEL_PARAM_RULES)
        spark = self._spark()
        users_first = src_col == self.getUserCol()
        src_index, dst_index = (
            (self._user_index, self._item_index) if users_first
            else (self._item_index, self._user_index)
        )  # fmt: skip
        recommendations = recommend_for_all(
            spark,
            src,
            dst,
            src_col,
            dst_col,
            num,
            self.getBlockSize(),
            conf.BROADCAST_THRESHOLD.get(spark),
            self.rank,
            candidates_cache=self._recommend_candidates,
        )
        return to_original_recommendations(recommendations, src_col, dst_col, src_index,
                                           dst_index)  # fmt: skip

    def recommendForAllUsers(self, numItems: int) -> DataFrame:
        """
        Returns top `numItems` items recommended for each user, for all users.

        Parameters
        ----------
        numItems : int
            max number of recommendations for each user

        Returns
        -------
        :py:class:`pyspark.sql.DataFrame`
            a DataFrame of (userCol, recommendations), where recommendations are
            stored as an array of (itemCol, rating) Rows.
        """
        return self._recommend(
            self._user_factors, self._item_factors, self.getUserCol(), self.getItemCol(), numItems
        )

    def recommendForAllItems(self, numUsers: int) -> DataFrame:
        """
        Returns top `numUsers` users recommended for each item, for all items.

        Parameters
        ----------
        numUsers : int
            max number of recommendations for each item

        Returns
        -------
        :py:class:`pyspark.sql.DataFrame`
            a DataFrame of (itemCol, recommendations), where recommendations are
            stored as an array of (userCol, rating) Rows.
        """
        return self._recommend(
            self._item_factors, self._user_factors, self.getItemCol(), self.getUserCol(), numUsers
        )

    def _subset(self, dataset: DataFrame, factors: DataFrame, column: str, index) -> DataFrame:
        # Spark: left_semi join, so duplicate ids collapse and unknown ids are left out.
        if index is not None:
            dataset = to_internal(dataset.select(column), column, index)
        return factors.join(dataset.select(column), factors["id"] == dataset[column], "left_semi")

    def recommendForUserSubset(self, dataset: DataFrame, numItems: int) -> DataFrame:
        """
        Returns top `numItems` items recommended for each user id in the input data set. Note that
        if there are duplicate ids in the input dataset, only one set of recommendations per unique
        id will be returned.

        Parameters
        ----------
        dataset : :py:class:`pyspark.sql.DataFrame`
            a DataFrame containing a column of user ids. The column name must match `userCol`.
        numItems : int
            max number of recommendations for each user

        Returns
        -------
        :py:class:`pyspark.sql.DataFrame`
            a DataFrame of (userCol, recommendations), where recommendations are
            stored as an array of (itemCol, rating) Rows.
        """
        subset = self._subset(dataset, self._user_factors, self.getUserCol(), self._user_index)
        return self._recommend(
            subset, self._item_factors, self.getUserCol(), self.getItemCol(), numItems
        )

    def recommendForItemSubset(self, dataset: DataFrame, numUsers: int) -> DataFrame:
        """
        Returns top `numUsers` users recommended for each item id in the input data set. Note that
        if there are duplicate ids in the input dataset, only one set of recommendations per unique
        id will be returned.

        Parameters
        ----------
        dataset : :py:class:`pyspark.sql.DataFrame`
            a DataFrame containing a column of item ids. The column name must match `itemCol`.
        numUsers : int
            max number of recommendations for each item

        Returns
        -------
        :py:class:`pyspark.sql.DataFrame`
            a DataFrame of (itemCol, recommendations), where recommendations are
            stored as an array of (userCol, rating) Rows.
        """
        subset = self._subset(dataset, self._item_factors, self.getItemCol(), self._item_index)
        return self._recommend(
            subset, self._user_factors, self.getItemCol(), self.getUserCol(), numUsers
        )

    # ------------------------------------------------------------------ fold-in
    def foldInUsers(
        self,
        dataset: DataFrame,
        *,
        regParam: Optional[float] = None,
        implicitPrefs: Optional[bool] = None,
        alpha: Optional[float] = None,
        nonnegative: Optional[bool] = None,
        ratingCol: Optional[str] = None,
    ) -> "ALSModel":
        """
        Returns a model whose user factors include the users of `dataset`, solved from their
        ratings against this model's item factors, which stay fixed.

        Each user gets one exact least-squares solve, the one an ALS half-iteration would give
        them: the fit's regularization (`regParam` times the user's number of ratings),
        implicit confidences and nonnegativity. New users are added and users the model knows
        are replaced (refreshed from the ratings given, which should be all of theirs); every
        other factor is this model's. Ratings of items the model does not know are left out,
        since they have no factor to solve against; a user left with none gets no factors.

        Parameters
        ----------
        dataset : :py:class:`pyspark.sql.DataFrame`
            ratings with columns `userCol`, `itemCol` and the fit's `ratingCol`, checked as
            `ALS.fit` checks them.
        regParam, implicitPrefs, alpha, nonnegative, ratingCol : optional
            the fit's values by default; a model loaded from Spark's own save does not know
            them, and then they must be given.

        Returns
        -------
        :py:class:`ALSModel`
            a new model, same params and uid, usable for `transform` and `recommendFor*`
            right away.
        """
        return self._fold_in(dataset, "user", regParam, implicitPrefs, alpha, nonnegative,
                             ratingCol)  # fmt: skip

    def foldInItems(
        self,
        dataset: DataFrame,
        *,
        regParam: Optional[float] = None,
        implicitPrefs: Optional[bool] = None,
        alpha: Optional[float] = None,
        nonnegative: Optional[bool] = None,
        ratingCol: Optional[str] = None,
    ) -> "ALSModel":
        """
        Returns a model whose item factors include the items of `dataset`, solved from their
        ratings against this model's user factors, which stay fixed: `foldInUsers` with the
        roles swapped.

        Parameters
        ----------
        dataset : :py:class:`pyspark.sql.DataFrame`
            ratings with columns `userCol`, `itemCol` and the fit's `ratingCol`.
        regParam, implicitPrefs, alpha, nonnegative, ratingCol : optional
            the fit's values by default (see `foldInUsers`).

        Returns
        -------
        :py:class:`ALSModel`
        """
        return self._fold_in(dataset, "item", regParam, implicitPrefs, alpha, nonnegative,
                             ratingCol)  # fmt: skip

    def _fold_in_settings(self, **given: Any) -> Dict[str, Any]:
        settings = {**self._training, **{k: v for k, v in given.items() if v is not None}}
        settings.setdefault("ratingCol", "rating")
        missing = [k for k in TRAINING_SETTINGS if k not in settings]
        if missing:
            raise illegal_argument(
                f"Fold-in needs the fit's {', '.join(missing)}, which this model does not record "
                "(it was not fitted by spark_gpu_mf's ALS, or loaded from such a save): pass "
                "them, e.g. foldInUsers(ratings, regParam=0.1, implicitPrefs=False, alpha=1.0, "
                "nonnegative=False)."
            )
        return settings

    def _fold_in(self, dataset, side, regParam, implicitPrefs, alpha, nonnegative, ratingCol):
        settings = self._fold_in_settings(
            regParam=regParam, implicitPrefs=implicitPrefs, alpha=alpha, nonnegative=nonnegative,
            ratingCol=ratingCol,
        )  # fmt: skip
        if settings["regParam"] < 0 or settings["alpha"] < 0:
            raise illegal_argument("Fold-in needs regParam >= 0 and alpha >= 0.")
        spark = dataset.sparkSession
        ratings, key, other = self._fold_in_ratings(dataset, side, settings["ratingCol"])
        indexes = {"user": self._user_index, "item": self._item_index}
        # Ratings of others the model lacks drop out in the join (they have no factor).
        ratings = to_internal(ratings, other, indexes[other])
        if indexes[key] is not None:
            # New ids continue the dense index: the next ones after the model's.
            new = ratings.select(key).join(indexes[key].select(F.col("key").alias(key)), key,
                                           "left_anti")  # fmt: skip
            added = build_index(new, offset=indexes[key].count(), what=f"{key} ids")
            indexes[key] = indexes[key].unionByName(added)
            ratings = to_internal(ratings, key, indexes[key])
        fixed = self._item_factors if side == "user" else self._user_factors
        config = SolveConfig(
            rank=self.rank,
            reg_param=float(settings["regParam"]),
            implicit=bool(settings["implicitPrefs"]),
            alpha=float(settings["alpha"]),
            nonnegative=bool(settings["nonnegative"]),
            memory_budget_bytes=conf.MEMORY_BUDGET.get(spark),
        )
        folded = fold_in(
            spark,
            ratings.select(F.col(key).alias("key"), F.col(other).alias("other"), "rating"),
            fixed,
            config,
            self._training.get("backend", "auto"),
        ).persist(StorageLevel.MEMORY_AND_DISK)
        old = self._user_factors if side == "user" else self._item_factors
        merged = old.join(folded.select("id"), "id", "left_anti").unionByName(folded)
        users, items = (merged, self._item_factors) if side == "user" else (self._user_factors,
                                                                            merged)  # fmt: skip
        model = type(self)._create(
            self.rank, users, items, uid=self.uid, training=self._training,
            user_index=indexes["user"], item_index=indexes["item"],
        )  # fmt: skip
        return self._copyValues(model)

    def _fold_in_ratings(self, dataset: DataFrame, side: str, rating_col: str):
        """``(ratings, key, other)``: ``(user, item, rating)`` checked as ``ALS.fit`` checks
        them (an indexed side's ids in their original type, non-null)."""
        if not self._indexed:
            ratings = validated_ratings(dataset, self.getUserCol(), self.getItemCol(), rating_col)
        else:
            for column, index in ((self.getUserCol(), self._user_index),
                                  (self.getItemCol(), self._item_index)):  # fmt: skip
                (check_numeric_column if index is None else check_indexable)(
                    dataset.schema, column
                )
            check_numeric_column(dataset.schema, rating_col)
            ratings = dataset.select(
                *[
                    (checked_id if index is None else non_null_id)(dataset, column).alias(alias)
                    for column, index, alias in (
                        (self.getUserCol(), self._user_index, "user"),
                        (self.getItemCol(), self._item_index, "item"),
                    )
                ],
                checked_rating(dataset, rating_col).alias("rating"),
            )
        return (ratings, "user", "item") if side == "user" else (ratings, "item", "user")

    # ------------------------------------------------------------------ persistence & misc
    def copy(self, extra: Optional["ParamMap"] = None) -> "ALSModel":
        """Creates a copy of this model with the same uid, factors and some extra params."""
        return super().copy(extra)

    def write(self) -> "ALSModelWriter":
        """Returns an MLWriter instance for this ML instance."""
        return ALSModelWriter(self)

    @classmethod
    def read(cls) -> "ALSModelReader":
        """Returns an MLReader instance for this class."""
        return ALSModelReader(cls)

    def __repr__(self) -> str:
        return f"ALSModel: uid={self.uid}, rank={self._rank}"


class ALSModelWriter(MLWriter):
    """Writes an ``ALSModel`` in Spark's layout (see ``spark_gpu_mf.spark.persistence``)."""

    def __init__(self, instance: ALSModel):
        super().__init__()
        self.instance = instance

    def save(self, path: str) -> None:
        """Save the model to ``path``; overwriting needs ``.overwrite()``, as in Spark."""
        if not isinstance(path, str):
            raise TypeError("path should be a string, got type %s" % type(path))
        self.saveImpl(path)

    def saveImpl(self, path: str) -> None:
        model = self.instance
        persistence.save_model(
            # The factors' session unless one was given: a process may hold a classic and a
            # Connect session, and only the factors know which one the model lives in.
            self._sparkSession or model._spark(),
            model,
            model.rank,
            model._user_factors,
            model._item_factors,
            path,
            overwrite=self.shouldOverwrite,
            python_class=f"{type(model).__module__}.{type(model).__name__}",
            training=model._training,
            user_index=model._user_index,
            item_index=model._item_index,
        )


class ALSModelReader(MLReader[ALSModel]):
    """Reads models saved by this package or by Spark's ``ALSModel``."""

    def __init__(self, cls: type):
        super().__init__()
        self.model_class = cls

    def load(self, path: str) -> ALSModel:
        metadata, rank, users, items, user_index, item_index = persistence.load_model_parts(
            self.sparkSession, path
        )
        training = metadata.get(persistence.TRAINING_KEY)
        model = self.model_class._create(
            rank, users, items, uid=metadata["uid"],
            training=training if isinstance(training, dict) else None,
            user_index=user_index, item_index=item_index,
        )  # fmt: skip
        _set_params_from_metadata(model, metadata)
        return model


def _set_params_from_metadata(model: ALSModel, metadata: Dict[str, Any]) -> None:
    """``DefaultParamsReader.getAndSetParams``: set params, then defaults Spark saved."""
    for name, value in metadata.get("paramMap", {}).items():
        if model.hasParam(name):
            model._set(**{name: value})
    for name, value in metadata.get("defaultParamMap", {}).items():
        if model.hasParam(name):
            model._setDefault(**{name: value})


def _saved_model_class(metadata: Dict[str, Any]) -> Optional[type]:
    """Our model class a saved stage names in ``pythonClass``; None for other stages.

    Only classes inside this package are imported: a model directory may come from elsewhere.
    """
    name = metadata.get(persistence.PYTHON_CLASS_KEY)
    if metadata.get("class") != persistence.SPARK_ALS_MODEL_CLASS or not isinstance(name, str):
        return None
    module, _, attribute = name.rpartition(".")
    if module.split(".")[0] != "spark_gpu_mf":
        return None
    try:
        found = getattr(importlib.import_module(module), attribute, None)
    except ImportError:  # saved by a version of this package that had it
        return None
    return found if isinstance(found, type) and issubclass(found, ALSModel) else None


def _install_stage_loader() -> None:
    """Wrap ``DefaultParamsReader.loadParamsInstance`` so that the stages we saved come back as
    our class (see the module docstring); idempotent, and safe on module reload."""
    current = DefaultParamsReader.loadParamsInstance
    pyspark_load = getattr(current, "_pyspark_original", current)

    def load_params_instance(path: str, sc):
        spark = sc if hasattr(sc, "createDataFrame") else SparkSession.active()
        model_class = _saved_model_class(DefaultParamsReader.loadMetadata(path, spark))
        if model_class is None:
            return pyspark_load(path, sc)
        return model_class.read().session(spark).load(path)

    load_params_instance._pyspark_original = pyspark_load
    load_params_instance.__doc__ = pyspark_load.__doc__
    DefaultParamsReader.loadParamsInstance = staticmethod(load_params_instance)


SparkALSModel.register(ALSModel)
_install_stage_loader()
