"""The embedded default: a small text-to-image world built from scikit-learn's handwritten digits."""
