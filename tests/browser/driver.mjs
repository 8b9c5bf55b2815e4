// A headless Chromium page that tests/console.rs drives: one JSON command per line on stdin,
// one JSON answer per line on stdout ({ok, value} or {ok: false, error}). The Rust test keeps
// the scenario (native gRPC clients, Redis, restarts); this only presses, reads and waits.
//
// Chromium is Debian's (CHROMIUM, default /usr/bin/chromium), started as the machine's probe
// found it must be here: no sandbox (root), and no background networking, which a closed
// network refuses.

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
const page = await context.newPage();

// What the page reported on its own: CSP violations and script errors among it.
const problems = [];
page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
// The console asks before ending a session; the tests answer yes.
page.on("dialog", (d) => d.accept());

const commands = {
  goto: ({ url }) => page.goto(url).then((r) => r && r.status()),
  fill: ({ selector, value }) => page.fill(selector, value),
  click: ({ selector }) => page.click(selector),
  // The text of every element `selector` matches, in document order.
  texts: ({ selector }) => page.$$eval(selector, (els) => els.map((e) => e.textContent)),
  // Waits until some element `selector` matches has a text containing `text`.
  waitText: ({ selector, text, timeout }) =>
    page.waitForFunction(
      ([s, t]) => Array.from(document.querySelectorAll(s)).some((e) => e.textContent.includes(t)),
      [selector, text],
      { timeout },
    ).then(() => null),
  // Waits until `expression` (a function's source) is true in the page.
  waitFor: ({ expression, timeout }) =>
    page.waitForFunction(expression, null, { timeout }).then(() => null),
  // Waits until `selector` matches exactly `count` elements.
  waitCount: ({ selector, count, timeout }) =>
    page.waitForFunction(
      ([s, n]) => document.querySelectorAll(s).length === n,
      [selector, count],
      { timeout },
    ).then(() => null),
  // An expression evaluated in the page (an async one is awaited).
  eval: ({ expression }) => page.evaluate(expression),
  sessionStorage: () => page.evaluate(() => JSON.stringify(sessionStorage)),
  url: () => page.url(),
  screenshot: ({ path }) => page.screenshot({ path, fullPage: true }).then(() => path),
  problems: () => problems.splice(0),
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  let answer;
  try {
    const command = JSON.parse(line);
    const run = commands[command.op];
    if (!run) throw new Error(`unknown op ${command.op}`);
    answer = { ok: true, value: (await run(command)) ?? null };
  } catch (e) {
    answer = { ok: false, error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await browser.close();
