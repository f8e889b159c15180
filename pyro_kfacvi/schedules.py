"""Learning-rate and momentum schedules."""


class WarmupPolynomialLR:
    r"""Linear warm-up, then polynomial decay (eqs. 13, 14), with momentum tied to it (eq. 6).

    .. math::

        α_t = α^{(0)} + (α_{base} − α^{(0)})\, t / T_{warm}                 \quad (t < T_{warm}),

        α_t = α_{base} \Big(1 − \frac{t − T_{warm}}{T_{fin} + T_{epoch} − T_{warm}}\Big)^p  \quad (t ≥ T_{warm}),

        m_t = (α_t / α_{base})\, m_{base}.

    ``T_fin + T_epoch`` in the denominator keeps α_t > 0 in the last epoch. Iterations ``t`` are
    counted from 0. :class:`~pyro_kfacvi.KFACVI` calls ``schedule(t)`` for α_t and multiplies its
    ``momentum`` argument (m_base) by ``schedule.momentum_scale(t)``.

    :param float initial_lr: α⁽⁰⁾.
    :param float base_lr: α_base.
    :param int total_steps: T_fin, the number of training iterations.
    :param int steps_per_epoch: T_epoch.
    :param int warmup_steps: T_warm (1000 in the paper).
    :param float power: p.
    """

    def __init__(self, initial_lr, base_lr, total_steps, steps_per_epoch, warmup_steps=1000, power=2.0):
        if not (0 <= initial_lr and 0 < base_lr):
            raise ValueError(f"need 0 <= initial_lr and 0 < base_lr, got {initial_lr}, {base_lr}")
        if not (0 <= warmup_steps < total_steps + steps_per_epoch and steps_per_epoch > 0):
            raise ValueError("need 0 <= warmup_steps < total_steps + steps_per_epoch and steps_per_epoch > 0")
        self.initial_lr, self.base_lr = float(initial_lr), float(base_lr)
        self.total_steps, self.steps_per_epoch = int(total_steps), int(steps_per_epoch)
        self.warmup_steps, self.power = int(warmup_steps), float(power)

    def __call__(self, t):
        if t < self.warmup_steps:
            return self.initial_lr + (self.base_lr - self.initial_lr) * t / self.warmup_steps  # (13)
        horizon = self.total_steps + self.steps_per_epoch - self.warmup_steps
        return self.base_lr * max(0.0, 1.0 - (t - self.warmup_steps) / horizon) ** self.power  # (14)

    def momentum_scale(self, t):
        """α_t / α_base, the factor of eq. (6)."""
        return self(t) / self.base_lr
