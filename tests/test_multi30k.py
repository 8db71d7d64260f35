"""fairseq_ext.multi30k offline: tiny .gz files in the Multi30K layout stand in for the download."""

import gzip
import shutil

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("fairseq")  # the fairseq_ext package registers with fairseq on import

from fairseq_ext import multi30k  # noqa: E402

# Multi30K-style image captions (German, English), written for this test.
PAIRS = [
    ("Zwei junge Männer stehen draußen neben einem Busch.", "Two young men are standing outside near a bush."),
    ("Ein Mann in einem blauen Hemd steht auf einer Leiter.", "A man in a blue shirt is standing on a ladder."),
    ("Eine Frau mit einer roten Tasche geht über die Straße.", "A woman with a red bag is crossing the street."),
    ("Ein kleines Mädchen klettert in ein Spielhaus aus Holz.", "A little girl climbs into a wooden playhouse."),
    ("Ein Hund rennt durch den Schnee.", "A dog runs through the snow."),
    ("Zwei Hunde spielen auf einer grünen Wiese.", "Two dogs are playing on a green meadow."),
    ("Ein Junge springt in einen See.", "A boy jumps into a lake."),
    ("Eine Gruppe von Menschen wartet an einer Bushaltestelle.", "A group of people waits at a bus stop."),
    ("Ein Mann fährt mit dem Fahrrad eine Straße entlang.", "A man rides a bicycle down a street."),
    ("Drei Kinder sitzen auf einer Bank im Park.", "Three children are sitting on a bench in the park."),
    ("Eine Frau liest ein Buch in einem Café.", "A woman is reading a book in a café."),
    ("Ein Koch bereitet in einer Küche Essen zu.", "A cook is preparing food in a kitchen."),
    ("Ein Mann spielt Gitarre auf der Straße.", "A man plays the guitar on the street."),
    ("Zwei Frauen unterhalten sich vor einem Geschäft.", "Two women are talking in front of a shop."),
    ("Ein Fußballspieler schießt den Ball ins Tor.", "A soccer player kicks the ball into the goal."),
    ("Ein älterer Mann sitzt auf einem Stuhl und lächelt.", "An older man sits on a chair and smiles."),
    ("Ein Kind in einem gelben Mantel hält einen Regenschirm.", "A child in a yellow coat holds an umbrella."),
    ("Eine Frau joggt am Strand entlang.", "A woman jogs along the beach."),
    ("Ein Arbeiter repariert das Dach eines Hauses.", "A worker is repairing the roof of a house."),
    ("Mehrere Personen fahren auf einem Boot über den Fluss.", "Several people ride a boat across the river."),
    ("Ein Mädchen füttert Enten an einem Teich.", "A girl feeds ducks at a pond."),
    ("Ein Mann mit Hut verkauft Obst auf dem Markt.", "A man with a hat sells fruit at the market."),
    ("Zwei Jungen spielen Basketball in einer Halle.", "Two boys play basketball in a gym."),
    ("Eine Frau fotografiert ein altes Gebäude.", "A woman takes a picture of an old building."),
    ("Ein Hund fängt eine Frisbeescheibe im Park.", "A dog catches a frisbee in the park."),
    ("Ein Mann schläft auf einer Bank im Bahnhof.", "A man sleeps on a bench in the train station."),
    ("Kinder bauen eine Sandburg am Strand.", "Children are building a sandcastle on the beach."),
    ("Ein Radfahrer trägt einen roten Helm.", "A cyclist is wearing a red helmet."),
    ("Eine Musikerin spielt Geige auf einer Bühne.", "A musician plays the violin on a stage."),
    ("Ein Mann und eine Frau tanzen auf einer Hochzeit.", "A man and a woman dance at a wedding."),
    ("Ein Baby schläft in den Armen seiner Mutter.", "A baby sleeps in its mother's arms."),
    ("Ein Skifahrer fährt einen steilen Hang hinunter.", "A skier goes down a steep slope."),
    # valid
    ("Eine Frau in einem weißen Kleid steht auf einer Brücke.", "A woman in a white dress stands on a bridge."),
    ("Zwei Männer arbeiten an einem Auto.", "Two men are working on a car."),
    ("Ein Junge wirft einen Ball zu seinem Hund.", "A boy throws a ball to his dog."),
    ("Menschen gehen durch eine belebte Straße.", "People walk through a busy street."),
    # test
    ("Ein Mann steht vor einem blauen Haus.", "A man stands in front of a blue house."),
    ("Ein Mädchen spielt mit einem kleinen Hund.", "A girl plays with a small dog."),
    ("Eine Gruppe von Kindern rennt über eine Wiese.", "A group of children runs across a meadow."),
    ("Ein Mann in einer orangefarbenen Weste arbeitet auf der Straße.",
     "A man in an orange vest is working on the street."),
    ("Zwei Frauen sitzen   in einem Café.  ", "  Two women sit in a café."),  # spaces stripped and collapsed
]
SPLITS = {"train": ("train", PAIRS[:32]), "valid": ("val", PAIRS[32:36]), "test": ("test_2016_flickr", PAIRS[36:])}


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


@pytest.fixture
def source(tmp_path):
    """A directory holding the six Multi30K task-1 files, as the repository names them."""
    src = tmp_path / "source"
    src.mkdir()
    for name, pairs in SPLITS.values():
        write_gz(src / f"{name}.de.gz", [de for de, _ in pairs])
        write_gz(src / f"{name}.en.gz", [en for _, en in pairs])
    return src


def lines(path):
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # only \n ends a line, as fairseq reads them


def test_file_names_are_the_repositorys():
    assert multi30k.BASE == "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
    assert multi30k.file_names() == {"train": ("train.de.gz", "train.en.gz"), "valid": ("val.de.gz", "val.en.gz"),
                                     "test": ("test_2016_flickr.de.gz", "test_2016_flickr.en.gz")}


def test_prepare_from_a_directory_and_rerun_without_it(source, tmp_path, capsys):
    out = tmp_path / "m30k"
    assert multi30k.main([str(out), "--source", str(source), "--vocab", "100"]) == 0
    assert "wrote 32 train, 4 valid, 5 test (test_2016_flickr) pairs" in capsys.readouterr().out
    for split, (name, pairs) in SPLITS.items():
        assert lines(out / "raw" / f"{split}.de") == [" ".join(de.split()) for de, _ in pairs]  # order kept
        assert lines(out / "raw" / f"{split}.en") == [" ".join(en.split()) for _, en in pairs]
        assert (out / "download" / f"{name}.de.gz").is_file() and (out / "download" / f"{name}.en.gz").is_file()
        assert len(lines(out / "tok" / f"{split}.de")) == len(pairs)
        for lang in ("de", "en"):
            for ext in ("bin", "idx"):
                assert (out / "bin" / f"{split}.de-en.{lang}.{ext}").stat().st_size > 0
    assert lines(out / "raw" / "test.en")[-1] == "Two women sit in a café."
    assert (out / "spm.model").is_file()
    assert (out / "bin" / "dict.de.txt").read_text() == (out / "bin" / "dict.en.txt").read_text()  # joined
    log = (out / "bin" / "preprocess.log").read_text()
    assert "32 sents" in log and "4 sents" in log and "5 sents" in log
    assert not list((out / "download").glob("*.part"))

    # a second run (another vocabulary) reuses the downloads: the source is gone and nothing is fetched
    shutil.rmtree(source)
    assert multi30k.main([str(out), "--source", "http://127.0.0.1:9/never-asked/", "--vocab", "90"]) == 0
    assert "wrote 32 train" in capsys.readouterr().out
    assert (out / "bin" / "train.de-en.de.bin").is_file() and len(lines(out / "raw" / "train.en")) == 32


def test_mismatched_line_counts_name_the_file(source, tmp_path, capsys):
    write_gz(source / "val.en.gz", [en for _, en in SPLITS["valid"][1]][:-1])
    out = tmp_path / "m30k"
    assert multi30k.main([str(out), "--source", str(source), "--vocab", "100"]) == 1
    err = capsys.readouterr().err
    assert str(out / "download" / "val.de.gz") in err and str(out / "download" / "val.en.gz") in err
    assert "has 4 lines" in err and "has 3" in err
    assert not (out / "bin").exists()


@pytest.mark.parametrize("base", ["http://127.0.0.1:9/multi30k", "file:///nonexistent/multi30k/"])
def test_unreachable_url_names_the_url_and_suggests_source(base, tmp_path, capsys):
    out = tmp_path / "m30k"
    assert multi30k.main([str(out), "--source", base]) == 1
    err = capsys.readouterr().err
    assert f"could not download {base.rstrip('/')}/train.de.gz" in err and "--source DIR" in err
    assert not list((out / "download").glob("*"))  # no partial file left behind


def test_missing_file_in_source_directory_and_broken_download(source, tmp_path, capsys):
    (source / "test_2016_flickr.en.gz").unlink()
    out = tmp_path / "m30k"
    assert multi30k.main([str(out), "--source", str(source)]) == 1
    assert str(source / "test_2016_flickr.en.gz") in capsys.readouterr().err

    (out / "download" / "train.de.gz").write_bytes(b"\x1f\x8b truncated")
    assert multi30k.main([str(out), "--source", str(source)]) == 1
    err = capsys.readouterr().err
    assert str(out / "download" / "train.de.gz") in err and "delete it" in err

    assert multi30k.main([str(tmp_path / "other"), "--source", str(tmp_path / "nowhere")]) == 1
    assert "neither a directory nor a URL" in capsys.readouterr().err
