"""A new search optimiser in one file: random mixes of global magnitude's and uniform's sparsities."""

from rr_alloc.allocators import AllocationProblem, get_allocator, round_to_budget
from rr_alloc.search.optimizers import Optimizer, SearchOptions, SearchSpace, register_optimizer


@register_optimizer
class GlobalUniformMix(Optimizer):
    name = "toy-mix"
    description = "random mixes of global magnitude and uniform"

    def space(self, problem: AllocationProblem, options: SearchOptions) -> SearchSpace:
        import optuna

        glob = get_allocator("global").sparsities(problem)
        uniform = get_allocator("uniform").sparsities(problem)

        def objective(trial: optuna.Trial) -> float:
            t = trial.suggest_float("t", 0.0, 1.0)
            counts = round_to_budget(problem, (1 - t) * glob + t * uniform)  # cost is linear: the budget holds
            trial.set_user_attr("counts", [int(k) for k in counts])
            return float(problem.evaluate(counts))

        def enqueue(study: optuna.Study) -> None:  # start at global magnitude, the search's anchor
            study.enqueue_trial({"t": 0.0})

        return SearchSpace(lambda seed: optuna.samplers.RandomSampler(seed=seed), enqueue, objective)
