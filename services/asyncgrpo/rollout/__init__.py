"""The rollout service: prompts -> G sampled completions (partial rollouts across weight updates) ->
rewards -> scored groups in the Redis queue, under the staleness admission budget."""
