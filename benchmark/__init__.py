"""deqbench benchmark package: datasets, evaluation runs and reporting for DEQ classifiers."""
