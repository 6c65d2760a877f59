"""What runs on the scheduler: the experiment monitor (a SchedulerPlugin; imports distributed)."""
from __future__ import annotations
