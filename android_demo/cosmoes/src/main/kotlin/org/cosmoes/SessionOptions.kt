// What cosmoes_open and cosmoes_generate are asked for, as Kotlin values turned into the C API's JSON objects.
package org.cosmoes

import org.json.JSONObject

/** cosmoes_open's options: the expert policy ("all" | "swap" | "lru:N") or a weight budget, CPU threads (0: the
 *  bundle's recipe), whether to verify every program's sha256, and whether to start reading each layer's experts
 *  while the layer before runs (prefetch). The library checks the values. */
data class SessionOptions(
    val policy: String = "swap",
    val budgetMb: Double? = null,
    val threads: Int = 0,
    val checkSha: Boolean = true,
    val prefetch: Boolean = false,
) {
    internal fun toJson(): String {
        val o = JSONObject().put("policy", policy).put("threads", threads).put("check_sha", checkSha)
            .put("prefetch", prefetch)
        budgetMb?.let { o.put("budget_mb", it) }
        return o.toString()
    }
}

/** cosmoes_generate's parameters: temperature 0 is greedy; top-p sampling from a stream seeded with [seed]. */
data class GenerationParams(
    val maxNewTokens: Int = 64,
    val temperature: Double = 0.0,
    val topP: Double = 1.0,
    val seed: Long = 0,
) {
    internal fun toJson(): String = JSONObject().put("max_new_tokens", maxNewTokens).put("temperature", temperature)
        .put("top_p", topP).put("seed", seed).toString()
}
