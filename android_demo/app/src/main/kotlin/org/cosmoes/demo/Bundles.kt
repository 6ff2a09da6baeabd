// The app's plain-JVM helpers (no android.* imports, compiled and checked on a JVM by tests/android_demo/): where
// bundles are, what a manifest says about their weight bytes, the "auto" memory budget, and the process's RSS.
package org.cosmoes.demo

import java.io.File
import org.json.JSONException
import org.json.JSONObject

/** A bundle directory and the weight bytes its manifest.json records (stored bytes, MB = 10^6 bytes as in the C
 *  library's budget). [minimumBytes] is what a memory budget must at least allow: the non-expert weights plus the
 *  top_k largest experts of every layer, below which cosmoes_open refuses the budget. */
data class BundleInfo(
    val dir: File,
    val nonExpertBytes: Long,
    val allExpertBytes: Long,
    val minimumBytes: Long,
) {
    val name: String get() = dir.name

    companion object {
        const val MANIFEST = "manifest.json"

        /** The manifest's byte counts, or null when it cannot be read (the library names the problem on open). */
        fun read(dir: File): BundleInfo? = try {
            val m = JSONObject(File(dir, MANIFEST).readText(Charsets.UTF_8))
            val nonExpert = m.optJSONObject("non_expert_bytes")?.let { o -> o.keys().asSequence().sumOf { o.getLong(it) } } ?: 0L
            val topK = m.optJSONObject("config")?.optInt("top_k", 0) ?: 0
            val layers = m.optJSONObject("experts")?.let { e -> e.keys().asSequence().map { expertBytes(e.getJSONObject(it)) }.toList() }
                ?: emptyList()
            BundleInfo(dir, nonExpert, layers.sumOf { it.sum() },
                nonExpert + layers.sumOf { it.sortedDescending().take(topK).sum() })
        } catch (e: java.io.IOException) {
            null
        } catch (e: JSONException) {
            null
        }

        private fun expertBytes(layer: JSONObject): List<Long> = layer.keys().asSequence().map { layer.getJSONObject(it).getLong("bytes") }.toList()
    }
}

/** The bundle directories (holding a manifest.json) directly under each root, sorted by name; missing roots are
 *  skipped. */
fun findBundles(vararg roots: File?): List<File> = roots.filterNotNull()
    .flatMap { root -> root.listFiles()?.filter { File(it, BundleInfo.MANIFEST).isFile } ?: emptyList() }
    .sortedBy { it.name }

/** "auto": half of what the system reports available (ActivityManager.MemoryInfo.availMem), capped at what keeping
 *  every expert needs. Half, because the budget counts stored weights only: the activation and KV-cache arena,
 *  XNNPACK's packed copies and the app itself come on top, and the low-memory killer acts well before availMem
 *  reaches zero. A budget below the bundle's minimum is passed on as it is: cosmoes_open refuses it with a line
 *  naming the minimum, which the app shows. */
fun autoBudgetMb(availMemBytes: Long, info: BundleInfo?): Double {
    val half = availMemBytes / 2
    val cap = info?.let { it.nonExpertBytes + it.allExpertBytes }?.takeIf { it > 0 } ?: half
    return minOf(half, cap) / 1e6
}

/** The process's resident set now (VmRSS of /proc/self/status, the figure the library's statistics use), in MB of
 *  10^6 bytes like theirs; null where there is no procfs. */
fun currentRssMb(): Double? = try {
    File("/proc/self/status").useLines { lines ->
        val kb = lines.firstOrNull { it.startsWith("VmRSS:") }?.split(Regex("\\s+"))?.getOrNull(1)?.toLongOrNull()
        kb?.let { it * 1024 / 1e6 }
    }
} catch (e: java.io.IOException) {
    null
}
