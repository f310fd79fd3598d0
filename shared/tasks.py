"""Built-in, procedurally generated tasks with an exact answer checker. They make every script runnable with
no arguments and no downloads, and give RL a reward that cannot be hacked.

`addition`: "a+b=" -> "c" with 0 <= a, b < 100. All 10,000 problems are split once, by a fixed seed that does
not depend on the run's seed, into 9,500 train and 500 held-out problems that never overlap.
"""
import random


class Addition:
    name = "addition"
    n_test = 500

    def __init__(self, max_operand: int = 100):
        problems = [(a, b) for a in range(max_operand) for b in range(max_operand)]
        random.Random(1234).shuffle(problems)
        self.splits = {"test": problems[: self.n_test], "train": problems[self.n_test:]}

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    @staticmethod
    def wrong_answer(a: int, b: int, rng: random.Random) -> str:
        """A plausible mistake: an off-by-one or off-by-ten sum, a dropped or doubled carry, swapped
        digits."""
        c = a + b
        candidates = {c + 1, c - 1, c + 10, c - 10, c + 9, c - 9, c + 11, c - 11, int(str(c)[::-1])}
        candidates = sorted(x for x in candidates if x >= 0 and x != c)
        return str(rng.choice(candidates))

    def rows(self, kind: str, split: str) -> list[dict]:
        rng = random.Random(f"{kind}-{split}")
        out = []
        for a, b in self.splits[split]:
            prompt, answer = self.prompt(a, b), str(a + b)
            if kind == "sft":
                out.append({"prompt": prompt, "response": answer})
            elif kind == "prompt":
                out.append({"prompt": prompt, "answer": answer})
            elif kind == "pair":
                out.append({"prompt": prompt, "chosen": answer, "rejected": self.wrong_answer(a, b, rng)})
            elif kind == "unpaired":  # alternate so both classes cover the same prompts
                good = rng.random() < 0.5
                out.append({"prompt": prompt, "response": answer if good else self.wrong_answer(a, b, rng),
                            "label": good})
            else:
                raise ValueError(kind)
        return out

    @staticmethod
    def reward(prompts: list[str], responses: list[str], answer: list[str], **_) -> list[float]:
        """1.0 for an exactly correct answer (surrounding spaces ignored), else 0.0."""
        return [float(r.strip() == a) for r, a in zip(responses, answer)]


TASKS = {"addition": Addition}


def get(name: str):
    return TASKS[name]()
