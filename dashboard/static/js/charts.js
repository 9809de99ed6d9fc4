// Training curves: one uPlot chart per quantity (loss, accuracy; a DPO job's reward margin, a reinforcement
// job's mean reward and KL to the starting model), train and
// validation series against the step. Metrics events arrive as separate train and eval points; they are merged
// by step here.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h } from "./dom.js";

const COLORS = { train: "#2563eb", valid: "#ea580c" };
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000, 50000, 100000];

export class MetricsCurves {
  constructor() {
    this.byStep = new Map(); // step -> {train_loss, valid_loss, train_mean_token_accuracy, ...}
    this.charts = [];
    this.el = h("div", { class: "charts", dataset: { points: "0" } });
    this.plots = [
      this._chart("Loss", "train_loss", "valid_loss", null),
      // Accuracy is a share: a fixed 0..1 axis keeps a flat start from being stretched into a cliff.
      this._chart("Accuracy", "train_mean_token_accuracy", "valid_mean_token_accuracy", [0, 1]),
      // Only DPO jobs report it: the chart stays hidden until a point has one.
      this._chart("Reward margin", "train_reward_margin", "valid_reward_margin", null, { optional: true }),
      // Only reinforcement jobs report these: the mean grade of the sampled answers, and how far the model moved.
      this._chart("Reward", "train_reward", "valid_reward", null, { optional: true }),
      this._chart("KL to the starting model", "train_kl", null, null, { optional: true }),
    ];
    // Redraw at the container's width: the grid reflows with the window.
    this.resizer = new ResizeObserver(() => this._resize());
    this.resizer.observe(this.el);
  }

  _chart(title, trainKey, validKey, range, { optional = false } = {}) {
    const box = h("figure", { class: "chart", dataset: { chart: title.toLowerCase().replace(/ /g, "-") } },
      h("figcaption", {}, title));
    const empty = h("div", { class: "chart-empty muted" }, "No points yet.");
    box.append(empty);
    box.hidden = optional;
    this.el.append(box);
    return { title, trainKey, validKey, range, optional, box, empty, plot: null };
  }

  _options(chart, width) {
    const series = (label, color, dash) => ({
      label,
      stroke: color,
      width: 2,
      dash,
      spanGaps: true, // validation points are sparse: join them rather than leave dots
      points: { show: label.startsWith("valid"), size: 5, fill: color },
      value: (_u, v) => (v === null || v === undefined ? "-" : v.toFixed(4)),
    });
    return {
      width,
      height: 220,
      scales: { x: { time: false }, y: chart.range ? { range: chart.range } : {} },
      // Steps are whole numbers: offer the x axis only integer tick spacings.
      axes: [{ label: "step", incrs: STEP_INCREMENTS }, { size: 56 }],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [{ label: "step" }, series("train", COLORS.train), series("validation", COLORS.valid, [6, 4])],
    };
  }

  _data(chart) {
    const steps = [...this.byStep.keys()].sort((a, b) => a - b);
    const col = (key) => steps.map((s) => {
      const v = this.byStep.get(s)[key];
      return typeof v === "number" && Number.isFinite(v) ? v : null;
    });
    return [steps, col(chart.trainKey), col(chart.validKey)];
  }

  // Add metrics events (any order, duplicates allowed); redraws the charts that changed.
  add(events) {
    let changed = false;
    for (const event of events) {
      const data = event.data || {};
      if (event.type !== "metrics" || typeof data.step !== "number") continue;
      const point = this.byStep.get(data.step) || {};
      for (const [k, v] of Object.entries(data)) if (typeof v === "number") point[k] = v;
      this.byStep.set(data.step, point);
      changed = true;
    }
    if (changed) this._redraw();
  }

  get points() {
    return this.byStep.size;
  }

  _redraw() {
    this.el.dataset.points = String(this.byStep.size);
    for (const chart of this.plots) {
      const data = this._data(chart);
      const hasAny = data[1].some((v) => v !== null) || data[2].some((v) => v !== null);
      chart.empty.hidden = hasAny;
      if (!hasAny) continue;
      chart.box.hidden = false; // before the plot is built: it takes the box's width
      if (!chart.plot) chart.plot = new uPlot(this._options(chart, this._width(chart)), data, chart.box);
      else chart.plot.setData(data);
    }
  }

  _width(chart) {
    return Math.max(280, Math.floor(chart.box.clientWidth || 480) - 8);
  }

  _resize() {
    for (const chart of this.plots) if (chart.plot) chart.plot.setSize({ width: this._width(chart), height: 220 });
  }

  destroy() {
    this.resizer.disconnect();
    for (const chart of this.plots) if (chart.plot) chart.plot.destroy();
  }
}
