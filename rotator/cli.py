"""Commands only: parse, call, print, exit code (0 ok, 1 failed and rolled back, 2 bad usage, 3 attention)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from rotator import log, shutdown
from rotator.credentials import short_key_id
from rotator.errors import Busy, ConfigError, RotatorError
from rotator.outcome import Outcome, Result

# What a command needs is imported in the command: `rotator --help` loads neither pydantic's models, the
# sinks nor any AWS, Vault or Kubernetes client.
if TYPE_CHECKING:
    from rotator.config import Config
    from rotator.fleet import UserStatus
    from rotator.runner import UserResult


class _Context:
    def __init__(self, config_path: str | None, debug: bool) -> None:
        self.config_path = config_path
        self.debug = debug

    def config(self) -> Config:
        """The config file, validated with every registered sink and probe type; it also sets how long
        cleanup may go on after a termination signal."""
        from rotator import registry

        if not self.config_path:
            raise ConfigError("--config: no config file given (use --config FILE or set ROTATOR_CONFIG)")
        config = registry.load_config(self.config_path)
        shutdown.set_timeout(config.service.shutdown_timeout.total_seconds())
        return config


def _fail(error: BaseException, debug: bool) -> NoReturn:
    if isinstance(error, RotatorError):
        click.echo(log.redact(f"error: {error}"), err=True)
        sys.exit(error.exit_code)
    log.get().debug("unexpected error", error=type(error).__name__, exc_info=error)  # shown with --debug
    click.echo(f"unexpected error: {type(error).__name__}" + ("" if debug else " (run with --debug for details)"),
               err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns rotator's errors into one line and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Every command runs with the process's signal handling installed (``shutdown``), once."""
        try:
            with shutdown.installed():
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # every error ends here, known ones as one line
            debug = isinstance(ctx.obj, _Context) and ctx.obj.debug
            _fail(exc, debug)


def _config_after_the_command(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.find_object(_Context).config_path = value  # type: ignore[union-attr]
    return value


def _with_config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--config FILE`` after the command too (``rotator status --config FILE``); it wins over one given
    before the command and over ROTATOR_CONFIG."""
    return click.option("--config", metavar="FILE", expose_value=False, callback=_config_after_the_command,
                        help="Config file (may also come before the command; default: $ROTATOR_CONFIG).")(command)


@click.group(cls=_Group)
@click.option("--config", "config_path", envvar="ROTATOR_CONFIG", metavar="FILE",
              help="Config file (default: $ROTATOR_CONFIG); may also come after the command.")
@click.option("--debug", is_flag=True, help="Debug logs and tracebacks of unexpected errors.")
@click.version_option(package_name="rotator")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """Rotate AWS IAM access keys without breaking the programs that use them."""
    log.configure(debug=debug)
    ctx.obj = _Context(config_path, debug)


@cli.command()
@_with_config_option
@click.option("--user", "user_name", required=True, help="IAM user: NAME, or ACCOUNT/NAME for another account.")
@click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")
@click.pass_obj
def rotate(obj: _Context, user_name: str, dry_run: bool) -> None:
    """Rotate one user's access key now."""
    from rotator import notify
    from rotator.fleet import Fleet
    from rotator.lock import make_locks

    config = obj.config()
    fleet = Fleet(config)
    locks = make_locks(config, fleet.account_id)  # an unusable lock_dir or Lease namespace: exit 2, nothing done
    target = fleet.target(user_name)
    with notify.delivering(() if dry_run else config.notify), locks.user(target.label) as held:
        if not held:
            raise Busy(f"user {target.label}: another rotator on this host is rotating it; standing aside")
        try:
            outcome = fleet.rotation(target).rotate(force=True, dry_run=dry_run)
        except RotatorError as exc:
            notify.report(fleet, target, notify.event_for_error(exc) or "", str(exc))
            raise
        notify.report(fleet, target, outcome.result.value, outcome.summary, old_key=outcome.old_key,
                      new_key=outcome.new_key)
        if outcome.old_key_in_use:
            notify.report(fleet, target, "old-key-in-use", outcome.old_key_in_use, old_key=outcome.old_key,
                          new_key=outcome.new_key)
    _print_outcome(outcome)


@cli.command()
@_with_config_option
@click.option("--once", is_flag=True, help="One pass over every user, then exit (the Kubernetes CronJob).")
@click.pass_obj
def run(obj: _Context, once: bool) -> None:
    """Keep every configured user rotated: the service, or with --once a single pass."""
    from rotator import notify
    from rotator.fleet import Fleet
    from rotator.lock import make_locks
    from rotator.runner import run_pass
    from rotator.scheduler import Service

    config = obj.config()
    fleet = Fleet(config)
    locks = make_locks(config, fleet.account_id)
    # rotations run in workers; the main thread only waits for them (and then for the notifications)
    with shutdown.main_thread_waits(), notify.delivering(config.notify):
        if not once:
            code = Service(fleet, locks).run()
        else:
            progress = _print_progress if sys.stdout.isatty() else None
            summary = run_pass(fleet, locks, progress=progress)
    if not once:
        shutdown.leave_if_abandoned(3)
        sys.exit(code)
    click.echo("\n".join(summary.lines()))
    shutdown.leave_if_abandoned(summary.exit_code)
    sys.exit(summary.exit_code)


@cli.command()
@_with_config_option
@click.option("--user", "user_name", help="Only this user (default: every configured user).")
@click.option("--force", is_flag=True, help="Recover even if the rotation looks like it is still running elsewhere.")
@click.option("--dry-run", is_flag=True, help="Print what would happen; change nothing.")
@click.pass_obj
def recover(obj: _Context, user_name: str | None, force: bool, dry_run: bool) -> None:
    """Finish or undo interrupted rotations and delete retired keys whose grace has passed."""
    from rotator.fleet import Fleet
    from rotator.lock import make_locks

    config = obj.config()
    fleet = Fleet(config)
    locks = make_locks(config, fleet.account_id)
    if user_name is not None:
        targets, worst = [fleet.target(user_name)], 0
    else:
        selection = fleet.select()
        targets, worst = selection.targets, _report_unreachable(selection.failures)
    for index, target in enumerate(targets):
        if shutdown.requested():  # stop between users: the ones left are untouched
            left = ", ".join(t.label for t in targets[index:])
            click.echo(f"error: received {shutdown.requested()}; not recovering {left}", err=True)
            worst = max(worst, 1)
            break
        try:
            with locks.user(target.label) as held:
                if not held:
                    raise Busy(f"user {target.label}: another rotator on this host is working on it")
                _print_outcome(fleet.rotation(target).recover(force=force, dry_run=dry_run))
        except RotatorError as exc:  # one user's failure does not stop the others
            click.echo(log.redact(f"error: {exc}"), err=True)
            worst = max(worst, exc.exit_code)
    sys.exit(worst)


@cli.command()
@_with_config_option
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_obj
def status(obj: _Context, output: str) -> None:
    """Each user's keys, their ages, when a rotation is due, and interrupted rotations."""
    from rotator.fleet import Fleet

    config = obj.config()
    fleet = Fleet(config)
    selection = fleet.select()
    rows: list[UserStatus] = []
    errors: dict[str, str] = dict(selection.failures)
    for target in selection.targets:
        try:
            rows.append(fleet.status(target))
        except RotatorError as exc:
            errors[target.label] = str(exc)
    if output == "json":
        payload = [r.as_dict() for r in rows] + [{"user": u, "error": e} for u, e in errors.items()]
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo("\n".join(_status_lines(rows)))
        for label, error in errors.items():
            click.echo(f"{label}: error: {error}", err=True)
    sys.exit(1 if errors else 0)


@cli.command("check-config")
@_with_config_option
@click.option("--connect", is_flag=True,
              help="Also check that IAM, every sink and the locks can be used: permissions, not just reachability.")
@click.pass_obj
def check_config(obj: _Context, connect: bool) -> None:
    """Validate the config (exit 2 if it is bad); with --connect also check, changing nothing, that a run
    would have every permission it needs: one line per user and check, exit 1 if any failed."""
    from rotator import notify, preflight
    from rotator.fleet import Fleet
    from rotator.lock import leader_namespace

    config = obj.config()
    if config.service.leader_election is not None:
        leader_namespace(config.service.leader_election)  # known at run time only from the pod: say so now
    notify.check(config.notify)  # a kubernetes-event target's pod, too
    fleet = Fleet(config)
    listed = fleet.listed()
    targets = [(target, fleet.rotation(target).sinks) for target in listed]  # builds every sink: bad settings
    sinks = sum(len(target.sinks) for target in listed)
    click.echo(f"config ok: {len(listed)} listed user(s), {len(config.select)} selection(s), {sinks} sink(s)")
    if not connect:
        return
    failed = _report_unreachable(fleet.select().failures) if config.select else 0
    for check in preflight.checks(fleet, targets):
        click.echo(log.redact(check.line()))
        failed = failed or int(not check.ok)
    sys.exit(failed)


@cli.command()
@_with_config_option
@click.pass_obj
def permissions(obj: _Context) -> None:
    """Print the least IAM policy rotator needs for the configured users."""
    from rotator.fleet import Fleet, iam_policy

    config = obj.config()
    click.echo(json.dumps(iam_policy(config), indent=2))
    fleet = Fleet(config)
    for target in fleet.listed():
        for sink in fleet.rotation(target).sinks:
            for need in sink.permissions():
                click.echo(f"# {target.label}: {sink.name}: {need}", err=True)


def _report_unreachable(failures: dict[str, str]) -> int:
    for where, error in failures.items():
        click.echo(log.redact(f"error: {where}: {error}"), err=True)
    return 1 if failures else 0


def _print_progress(result: UserResult, done: int, total: int) -> None:
    click.echo(f"[{done}/{total}] {result.label}: {result.outcome.value}: {result.message}")


def _print_outcome(outcome: Outcome) -> None:
    prefix = "dry run: " if outcome.result is Result.DRY_RUN else ""
    click.echo(f"{prefix}{outcome.user}: {outcome.result.value}: {outcome.summary}")
    for action in outcome.actions:
        click.echo(f"  - {action}")
    if outcome.old_key_in_use:
        click.echo(f"warning: {outcome.old_key_in_use}", err=True)


def _status_lines(rows: Iterable[UserStatus]) -> list[str]:
    lines = [f"{'USER':<20} {'KEY':<12} {'STATUS':<9} {'AGE':>5}  NOTE"]
    for row in rows:
        due = "due now" if row.due else (f"due {row.due_at:%Y-%m-%d}" if row.due_at else "")
        if not row.keys:
            lines.append(f"{row.user:<20} {'-':<12} {'-':<9} {'-':>5}  no keys; {due}")
        for index, key in enumerate(row.keys):
            note = ("in use after it was replaced" if key.in_use else "replaced; awaiting its last-use check"
                    ) if key.active and key.replaced_at else due if key.active else (
                f"retired; delete after {key.retired_until:%Y-%m-%d %H:%M}" if key.retired_until else "inactive")
            name = (f"{row.account}/{row.user}" if row.account else row.user) if index == 0 else ""
            status_text = "Active" if key.active else "Inactive"
            lines.append(f"{name:<20} {short_key_id(key.key_id):<12} {status_text:<9} {key.age_days:>4}d  {note}")
        if row.interrupted:
            pending = row.interrupted
            phase = pending.phase.value + (", rolling back" if pending.rolling_back else "")
            lines.append(f"{'':<20} interrupted rotation: phase {phase}, new key "
                         f"{short_key_id(pending.new_key)}, started {pending.started:%Y-%m-%d %H:%M} by "
                         f"{pending.owner} (rotator recover --user {row.user})")
        lines.extend(f"{'':<20} note: {note}" for note in row.notes)
    return lines


def main() -> None:
    cli(prog_name="rotator")
