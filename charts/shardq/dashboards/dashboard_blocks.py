"""The dashboards' building blocks: a PromQL target, a time series, a stat, rate and quantile
expressions, and ``assemble``, which lays panels out in rows as a dashboard.

Used by ``dashboards_jobs.py`` and ``dashboards_servers.py`` (one function per panel) and
``generate.py``. Must not: write files.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat as sb
from grafana_foundation_sdk.builders import timeseries as tb
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Grafana's rate window: at least four scrape intervals, whatever the zoom.
RI = "$__rate_interval"
#: Node targets (as in the alert rules): a job named *shardq* that is not a gateway.
NODE_UP = 'up{job=~".*shardq.*", job!~".*gateway.*"}'

Panel = tb.Panel | sb.Panel



# -- building blocks ------------------------------------------------------------------------------


def q(expr: str, legend: str = "") -> pb.Dataquery:
    """One PromQL target (the refId is set when the panel is assembled)."""
    target = pb.Dataquery().expr(expr).datasource(DS).range()
    if legend:
        target = target.legend_format(legend)
    return target


def timeseries(title: str, description: str, unit: str, *targets: pb.Dataquery,
               width: int = 12, stacked: bool = False, min_zero: bool = True) -> tb.Panel:
    panel = (
        tb.Panel().title(title).description(description).datasource(DS).unit(unit)
        .span(width).height(8).fill_opacity(10).line_width(1)
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
    )
    if min_zero:
        panel = panel.min(0)
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    for ref, target in zip("ABCDEFGHIJ", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def stat(title: str, description: str, unit: str, *targets: pb.Dataquery,
         red_above: float | None = None, width: int = 6) -> sb.Panel:
    panel = (
        sb.Panel().title(title).description(description).datasource(DS).unit(unit)
        .span(width).height(4).graph_mode(cm.BigValueGraphMode.AREA)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    if red_above is not None:
        panel = panel.thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="green"), dm.Threshold(value=red_above, color="red"),
        ]))
    for ref, target in zip("ABCDEFGHIJ", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def rate(metric: str, selector: str = "", by: str = "") -> str:
    """``sum [by (…)] (rate(metric{selector}[$__rate_interval]))``."""
    grouping = f" by ({by}) " if by else ""
    sel = f"{{{selector}}}" if selector else ""
    return f"sum{grouping}(rate({metric}{sel}[{RI}]))"


def quantile(phi: float, histogram: str, selector: str = "", by: str = "") -> str:
    """``histogram_quantile(phi, …)`` over the buckets of ``histogram`` (base name)."""
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({phi}, {rate(histogram + '_bucket', selector, keep)})"


JOBS_S = "suffix: jobs/s"


def query_variable(name: str, label: str, query: str, every: bool = False) -> db.QueryVariable:
    """A variable whose values a PromQL label query lists, sorted; ``every``: several may be
    picked at once, and "All" is ``.*``."""
    variable = (
        db.QueryVariable(name).label(label).datasource(DS).query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
    )
    if every:
        variable = variable.multi(True).include_all(True).all_value(".*")
    return variable


# -- assembling -----------------------------------------------------------------------------------


def assemble(uid: str, title: str, description: str, variables: list[db.QueryVariable],
             sections: list[tuple[str, list[Panel]]]) -> db.Dashboard:
    """A dashboard: the datasource variable first, rows in order, panel ids 1, 2, 3, …"""
    dash = (
        db.Dashboard(title).uid(uid).description(description).tags(["shardq"])
        .time("now-1h", "now").refresh("30s").timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(db.DashboardLink("shardq").type(dm.DashboardLinkType.DASHBOARDS).tags(["shardq"])
              .as_dropdown(True).include_vars(False).keep_time(True))
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for variable in variables:
        dash = dash.with_variable(variable)
    next_id = 1
    for row_title, panels in sections:
        dash = dash.with_row(db.Row(row_title).id(next_id))
        next_id += 1
        for panel in panels:
            dash = dash.with_panel(panel.id(next_id))
            next_id += 1
    return dash


