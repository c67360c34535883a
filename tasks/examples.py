"""Demo tasks, submittable by these exact names. Each takes `delay` (seconds per step)
so demos and tests can watch them move. `register(app)` adds them to an app: they are
not shared tasks, so an app of yours in the same process never sees them."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Celery, Task

from jobwire.tasks.progress import ProgressTask

MAX_DELAY = 60.0


def _check_delay(delay: Any) -> float:
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError(f"delay must be a number of seconds, got {delay!r}")
    if not 0 <= delay <= MAX_DELAY:
        raise ValueError(f"delay must be between 0 and {MAX_DELAY} seconds, got {delay}")
    return float(delay)


def long_running_task(self: Task, delay: float = 1.0) -> dict[str, Any]:
    """Validates, processes and uploads (VALIDATING → PROCESSING → UPLOADING), with plain update_state."""
    # The spec's body, as Celery documents custom states: no jobwire API in it. An
    # attached app streams each update_state as an event.
    delay = _check_delay(delay)
    self.update_state(state="VALIDATING", meta={"step": 1, "total": 3, "description": "Validating input"})
    time.sleep(delay)
    self.update_state(state="PROCESSING", meta={"step": 2, "total": 3, "description": "Processing data"})
    time.sleep(delay)
    self.update_state(state="UPLOADING", meta={"step": 3, "total": 3, "description": "Uploading results"})
    time.sleep(delay)
    return {"status": "done", "steps": 3}


def report_steps(self: ProgressTask, steps: int = 5, delay: float = 1.0) -> dict[str, Any]:
    """Counts through `steps` steps with report(); stops early, cooperatively, when revoked."""
    delay = _check_delay(delay)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an integer from 1 to 1000, got {steps!r}")
    for done in range(steps):
        # `step` names the step in progress; percent counts the steps already done, so the
        # bar never shows 100% while the last step still runs.
        seq = self.report(
            "WORKING",
            step=done + 1,
            total=steps,
            percent=100.0 * done / steps,
            description=f"Step {done + 1} of {steps}",
        )
        if seq is None:
            return {"status": "cancelled", "steps": done}
        time.sleep(delay)
    return {"status": "done", "steps": steps}


def failing_task(self: ProgressTask, delay: float = 1.0) -> None:
    """Processes one step, then fails with a clear error."""
    delay = _check_delay(delay)
    self.report("PROCESSING", step=1, total=2, description="Processing data", percent=0)
    time.sleep(delay)
    raise ValueError("Simulated failure: the input file is corrupt at row 42")


def retrying_task(self: ProgressTask, delay: float = 1.0, failures: int = 1) -> dict[str, Any]:
    """Fails its first `failures` attempts with a transient error, retrying after `delay`."""
    delay = _check_delay(delay)
    self.report("PROCESSING", step=1, total=1, description=f"Attempt {self.request.retries + 1}", percent=0)
    time.sleep(delay)
    if self.request.retries < failures:
        try:
            raise ConnectionError("Upstream service unavailable")
        except ConnectionError as exc:
            raise self.retry(exc=exc, countdown=delay) from exc
    return {"status": "done", "attempts": self.request.retries + 1}


def charge_customer(
    self: ProgressTask, customer_id: str = "cus_demo", amount_cents: int = 1000, delay: float = 0.2
) -> dict[str, Any]:
    """Charges a customer through the (simulated) payments API: 5 calls a second, shared by every worker."""
    delay = _check_delay(delay)
    self.throttle("stripe_api", rate="5/s")
    self.report("CHARGING", step=0, total=1, description=f"Charging {customer_id}")
    time.sleep(delay)  # the API call, simulated locally
    return {"charge": f"ch_{uuid.uuid4().hex[:12]}", "customer": customer_id, "amount_cents": amount_cents}


def send_push_notification(
    self: ProgressTask, user_id: str = "user_1", message: str = "Hello", delay: float = 0.1
) -> dict[str, Any]:
    """Sends a push notification (simulated): 2 a second per tenant, so no tenant starves another."""
    delay = _check_delay(delay)
    self.throttle("push", per="tenant", rate="2/s")
    self.report("SENDING", step=0, total=1, description=f"Notifying {user_id}")
    time.sleep(delay)  # the push provider, simulated locally
    return {"delivered": True, "user_id": user_id}


def limited_call(
    self: ProgressTask, limit: str = "demo_api", per: str | None = None, delay: float = 0.0
) -> float:
    """Calls a (simulated) quota-limited API through the distributed limit `limit`; returns when it ran."""
    delay = _check_delay(delay)
    self.throttle(limit, per=per)
    ran = time.time()
    self.report("CALLING", step=0, total=1, description=f"Calling through {limit}")
    time.sleep(delay)
    return ran


def generate_report(self: ProgressTask, pages: int = 50, delay: float = 0.0) -> dict[str, Any]:
    """Renders a multi-page PDF report (reportlab), page by page, and stores it: the result is a download."""
    from io import BytesIO

    try:  # an extra: the demo's PDF is no dependency of jobwire itself
        from reportlab.lib.pagesizes import A4
        from reportlab.pdfgen.canvas import Canvas
    except ImportError as exc:
        raise ImportError(
            f"generate_report renders its PDF with reportlab, which is not installed ({exc}): "
            "pip install 'jobwire[demo]'"
        ) from exc

    delay = _check_delay(delay)
    if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= 2000:
        raise ValueError(f"pages must be an integer from 1 to 2000, got {pages!r}")
    buffer = BytesIO()
    pdf = Canvas(buffer, pagesize=A4)
    width, height = A4
    for page in range(1, pages + 1):
        self.report("RENDERING", step=page - 1, total=pages, description=f"Page {page} of {pages}")
        pdf.setFont("Helvetica-Bold", 20)
        pdf.drawString(72, height - 96, f"Quarterly report, page {page} of {pages}")
        pdf.setFont("Helvetica", 11)
        for line in range(30):
            pdf.drawString(
                72,
                height - 140 - line * 18,
                f"Row {line + 1}: {(page * 7919 + line * 104729) % 100000:>6} units",
            )
        pdf.showPage()
        time.sleep(delay)
    pdf.save()
    self.report("UPLOADING", step=pages, total=pages, description="Storing the PDF")
    return self.store_result(buffer.getvalue(), content_type="application/pdf", filename="report.pdf")


def export_rows(self: ProgressTask, rows: int = 1000) -> list[dict[str, Any]]:
    """Exports `rows` rows as JSON; a big export is stored automatically and returned as a download."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= 1_000_000:
        raise ValueError(f"rows must be an integer from 1 to 1000000, got {rows!r}")
    self.report("EXPORTING", step=0, total=1, description=f"Exporting {rows} rows")
    return [{"row": i, "sku": f"SKU-{i:08d}", "qty": (i * 7919) % 1000, "note": "x" * 8} for i in range(rows)]


def digest_email(self: ProgressTask, delay: float = 0.0) -> str:
    """Sends the daily digest (simulated), under Celery's own per-node rate_limit of 1/m."""
    time.sleep(_check_delay(delay))
    return "sent"


def plain_sum(numbers: list[float], delay: float = 0.0) -> float:
    """An ordinary Celery task (no jobwire base class): it still gets lifecycle events."""
    time.sleep(_check_delay(delay))
    return float(sum(numbers))


def register(app: Celery) -> None:
    """Add the demo tasks to `app`, under the names above."""
    app.task(bind=True, name="long_running_task")(long_running_task)
    app.task(bind=True, base=ProgressTask, name="report_steps")(report_steps)
    app.task(bind=True, base=ProgressTask, name="failing_task")(failing_task)
    app.task(bind=True, base=ProgressTask, name="retrying_task", max_retries=3)(retrying_task)
    app.task(bind=True, base=ProgressTask, name="charge_customer")(charge_customer)
    app.task(bind=True, base=ProgressTask, name="send_push_notification")(send_push_notification)
    app.task(bind=True, base=ProgressTask, name="limited_call")(limited_call)
    app.task(bind=True, base=ProgressTask, name="digest_email", rate_limit="1/m")(digest_email)
    app.task(bind=True, base=ProgressTask, name="generate_report")(generate_report)
    app.task(bind=True, base=ProgressTask, name="export_rows")(export_rows)
    app.task(name="plain_sum")(plain_sum)
