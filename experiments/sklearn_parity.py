"""scikit-learn parity: fml's linear regression, logistic regression, SVM and MLP
next to scikit-learn's estimators, trained in the same run on the same arrays.

    python experiments/sklearn_parity.py [--out runs/parity] [--scale 1.0]
"""

from fml import experiment, parity

if __name__ == "__main__":
    experiment.script_main(__doc__, "runs/parity", parity.parity_table)
