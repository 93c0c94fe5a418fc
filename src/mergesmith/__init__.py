"""mergesmith: merge language models without training."""

from mergesmith._version import __version__


def merge(recipe, out_dir, **options):
    """Merge the models a recipe names into ``out_dir``; see ``mergesmith.engine.run.merge`` (calibration
    statistics come from ``mergesmith.calibrate``, wired in by ``mergesmith.api``)."""
    from mergesmith.api import merge as _merge

    return _merge(recipe, out_dir, **options)
