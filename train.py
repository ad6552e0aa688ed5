"""Train a covidxr classifier: `python train.py` is `covidxr train` (see covidxr/training.py).

The shipped model:  python train.py --out runs/shipped
The 2020 experiment: python train.py --classes covid normal --filter view=PA \
                         --filter source_dataset=ieee8023,kermany --out runs/2020
`python train.py --help` lists the options.
"""

from covidxr.training import main

if __name__ == "__main__":
    main()
