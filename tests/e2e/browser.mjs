// Drives the daemon's browser client in headless Chromium with a fake camera:
// 1. frames from the (fake) camera round-trip through the daemon and show up on the output canvas;
// 2. on a still test pattern the output settles, and a prompt typed into the prompt box changes it;
// 3. when the daemon has a ControlNet: choosing Canny control in the page changes the output, and a
//    ControlNet scale of 0 brings back the output without control;
// 4. the daemon's LoRA (allowed with --lora-control) has a slider; moving it to 0 changes the output;
// 5. when the connection drops, the page reconnects with backoff, restores the prompt and settings on the new
//    stream (the same output comes back) and keeps streaming.
// Usage: node browser.mjs http://127.0.0.1:PORT/   (exit code 0 = pass)
import { chromium } from "playwright-core";

const url = process.argv[2];
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const log = (...a) => console.log("[e2e]", ...a);
const fail = (msg) => { console.error("[e2e] FAIL:", msg); process.exit(1); };

const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
  ],
});
const timeout = 180_000;
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => log("page error:", e.message));
  await page.goto(url);
  await page.waitForFunction(() => window.sdstream && window.sdstream.ready, null, { timeout });
  const model = await page.evaluate(() => window.sdstream.model);
  log("ready:", JSON.stringify(model));
  if (!model.test_model) fail("expected the bundled random-weight test model");
  const banner = await page.textContent("#warning");
  if (!/TEST model/.test(banner)) fail(`the page does not say it runs a test model: "${banner}"`);

  // 1. Camera frames round-trip.
  await page.click("#camera");
  await page.waitForFunction(() => window.sdstream.framesReceived >= 3, null, { timeout });
  const cam = await page.evaluate(() => ({ sent: window.sdstream.framesSent, got: window.sdstream.framesReceived, src: window.sdstream.source, errors: window.sdstream.errors }));
  log("camera round trip:", JSON.stringify(cam));
  if (cam.src !== "camera") fail("the camera did not start");

  // 2. A still picture, deterministic guidance: the output settles; a new prompt changes it.
  const settled = async () => {
    const v0 = await page.evaluate(() => window.sdstream.settingsVersion);
    await page.selectOption("#cfg", "none");
    await page.waitForFunction((v) => window.sdstream.settingsVersion > v, v0, { timeout });
  };
  await settled();
  await page.click("#pattern");
  const snapshotAfter = async (frames) => {
    const start = await page.evaluate(() => window.sdstream.framesReceived);
    await page.waitForFunction((n) => window.sdstream.framesReceived >= n, start + frames, { timeout });
    return page.evaluate(() => document.getElementById("output").toDataURL("image/png"));
  };
  const a1 = await snapshotAfter(5);
  const a2 = await snapshotAfter(2);
  if (a1 !== a2) fail("the output of a still picture did not settle");
  log("still picture: output settled");

  const v0 = await page.evaluate(() => window.sdstream.settingsVersion);
  await page.fill("#prompt", "a completely different prompt: a neon city at night");
  await page.press("#prompt", "Enter");
  await page.waitForFunction((v) => window.sdstream.settingsVersion > v, v0, { timeout });
  const prompt = await page.evaluate(() => window.sdstream.settings.prompt);
  if (!prompt.includes("neon city")) fail(`the prompt did not reach the daemon: ${prompt}`);
  const b = await snapshotAfter(5);
  if (b === a2) fail("changing the prompt did not change the output");
  log("prompt change changed the output");

  // 3. ControlNet controls (the daemon runs with a test ControlNet).
  if (!model.controlnet) fail("expected the daemon to run with a ControlNet");
  if (await page.isHidden("#controlbox")) fail("the ControlNet controls are hidden although the daemon has one");
  // Waits until the daemon's echo of the settings holds `value` for `key` (echoes of earlier changes may
  // still be on their way, so the version counter alone is not enough).
  const setAndWait = async (act, key, value) => {
    await act();
    try {
      await page.waitForFunction(([k, v]) => window.sdstream.settings && window.sdstream.settings[k] === v,
        [key, value], { timeout: 30_000 });
    } catch (e) {
      fail(`${key} = ${value} did not reach the daemon: ${JSON.stringify(await page.evaluate(() => window.sdstream.settings))}`);
    }
  };
  await setAndWait(() => page.selectOption("#control", "canny"), "control", "canny");
  const c = await snapshotAfter(5);
  if (c === b) fail("Canny control did not change the output");
  log("canny control changed the output");
  await setAndWait(() => page.evaluate(() => {
    const el = document.getElementById("controlnet_scale");
    el.value = "0";
    el.dispatchEvent(new Event("change"));
  }), "controlnet_scale", 0);
  const d = await snapshotAfter(5);
  if (d !== b) fail("ControlNet scale 0 did not give the output without control");
  log("controlnet_scale 0 gives the output without control");

  // 4. LoRA slider.
  const loras = await page.evaluate(() => window.sdstream.loras);
  if (!loras || loras.length !== 1 || loras[0].scale !== 1) fail(`expected one LoRA at scale 1: ${JSON.stringify(loras)}`);
  if (await page.isHidden("#lorabox")) fail("the LoRA slider is hidden although the daemon allows LoRA control");
  await page.evaluate(() => {
    const el = document.querySelector("#lorabox input[data-lora]");
    el.value = "0";
    el.dispatchEvent(new Event("change"));
  });
  await page.waitForFunction(() => window.sdstream.loras[0].scale === 0, null, { timeout: 30_000 });
  const e = await snapshotAfter(5);
  if (e === d) fail("LoRA scale 0 did not change the output");
  log("the LoRA slider changed the output");

  // 5. The connection drops under the page: it reconnects, restores what the user set, and streams on.
  const r0 = await page.evaluate(() => window.sdstream.reconnects);
  await page.evaluate(() => window.sdstream.ws.close());
  await page.waitForFunction((r) => window.sdstream.reconnects > r && window.sdstream.ready, r0, { timeout: 30_000 });
  try {
    await page.waitForFunction(() => {
      const s = window.sdstream.settings;
      return s && s.prompt.includes("neon city") && s.control === "canny" && s.controlnet_scale === 0 && s.cfg_type === "none";
    }, null, { timeout: 30_000 });
  } catch (err) {
    fail(`settings not restored after the reconnect: ${JSON.stringify(await page.evaluate(() => window.sdstream.settings))}`);
  }
  const f = await snapshotAfter(5);
  const f2 = await snapshotAfter(2);
  if (f !== f2) fail("the output did not settle after the reconnect");
  if (f !== e) fail("the output after the reconnect differs from the one before (settings not all restored)");
  log("reconnected with the settings restored: the same output");

  const stats = await page.textContent("#stats");
  log("stats line:", stats.replace(/\n/g, " | "));
  if (!/fps out/.test(stats)) fail("no stats shown");
  log("PASS");
} finally {
  await browser.close();
}
