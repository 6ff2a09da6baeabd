// The headless benchmark `cosmoes bench --device adb --app` starts:
//   adb shell am start -W -n org.cosmoes.demo/.BenchActivity --es bundle DIR --es prompt FILE --es stats FILE ...
// It hands the intent's extras to the library's BenchRun (org.cosmoes) with a description of the phone, runs it on a
// worker thread while the (transparent) activity stays in the foreground, and finishes.
package org.cosmoes.demo

import android.app.Activity
import android.os.Build
import android.os.Bundle
import android.util.Log
import android.view.WindowManager
import java.io.File
import kotlin.concurrent.thread
import org.cosmoes.BenchRun
import org.cosmoes.CosmoesException
import org.json.JSONObject

class BenchActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        // A recreated activity (its process restarted) must not run the benchmark a second time
        if (savedInstanceState != null) return finish()
        // The screen stays on so that the phone neither sleeps nor throttles the foreground app mid-run
        window.addFlags(WindowManager.LayoutParams.FLAG_KEEP_SCREEN_ON)
        val extras = extrasOf(intent.extras)
        thread(name = "cosmoes-bench") {
            benchmark(extras)
            runOnUiThread { finish() }
        }
    }

    private fun benchmark(extras: Map<String, String?>) {
        val request = try {
            BenchRun.fromExtras(extras)
        } catch (e: CosmoesException) {
            // `cosmoes bench` polls the stats file: a bad extra is reported there, as BenchRun reports its failures
            Log.e(TAG, e.message ?: "bad extras")
            extras["stats"]?.let { writeError(it, e.message ?: "bad extras") }
            return
        }
        val ok = BenchRun.run(request.copy(device = deviceInfo()))
        Log.i(TAG, if (ok) "statistics written to ${request.statsPath}" else "failed: see ${request.statsPath}")
    }

    // Every extra as text: `--es` gives strings, and `--ei gen 32` must not be dropped silently as a non-string
    private fun extrasOf(bundle: Bundle?): Map<String, String?> =
        bundle?.keySet()?.associateWith { key -> @Suppress("DEPRECATION") bundle.get(key)?.toString() } ?: emptyMap()

    // The same keys `cosmoes bench --device adb` reads with getprop, from the app's side
    private fun deviceInfo(): Map<String, String> = buildMap {
        put("kind", "android-app")
        put("model", "${Build.MANUFACTURER} ${Build.MODEL}")
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.S) put("soc", "${Build.SOC_MANUFACTURER} ${Build.SOC_MODEL}")
        put("board", Build.BOARD)
        put("android", Build.VERSION.RELEASE)
        put("sdk", Build.VERSION.SDK_INT.toString())
        put("abi", Build.SUPPORTED_ABIS.firstOrNull() ?: "")
        put("cores", Runtime.getRuntime().availableProcessors().toString())
    }

    private fun writeError(path: String, message: String) {
        runCatching {
            val target = File(path)
            val tmp = File("$path.tmp")
            tmp.writeText(JSONObject().put("error", message.lineSequence().first()).toString() + "\n")
            if (!tmp.renameTo(target)) target.writeText(tmp.readText())
        }.onFailure { Log.e(TAG, "cannot write $path: ${it.message}") }
    }

    private companion object {
        const val TAG = "CosmoesBench"
    }
}
