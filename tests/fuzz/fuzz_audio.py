"""Coverage-guided fuzzing (atheris) of the audio loader (`load_audio`, from a file and from stdin).

Every input must end in a correct result or a one-line SfcError, touching no file outside
its sandbox's output folder (`fuzz.contract.audio_target`); anything else is a crash. Run
(README.md has the flags):

    python tests/fuzz/fuzz_audio.py -max_total_time=60 -timeout=10 \\
        -artifact_prefix=/tmp/ /tmp/audio-new tests/fuzz/corpus/audio
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the fuzz package
with atheris.instrument_imports(include=["sfc", "fuzz"]):
    from fuzz.contract import audio_target


def main() -> None:
    atheris.Setup(sys.argv, audio_target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
