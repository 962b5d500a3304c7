"""A user reward function that returns NaN (for the non-finite guard): a real bug a user can write."""


def nan_reward(prompt: str, completion: str) -> float:
    return float("nan")
