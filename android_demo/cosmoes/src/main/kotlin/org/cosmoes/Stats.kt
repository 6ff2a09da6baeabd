// The statistics JSON of a generation (cosmoes_stats_json) and the fields the app shows.
package org.cosmoes

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject

/** The statistics JSON of the last generation (same schema as `cosmoes_runner --stats-json`), with the fields the
 *  app shows. [residentPerLayer] is how many experts each layer holds at the end of the generation. */
data class Stats(
    val json: String,
    val ttftMs: Double,
    val prefillTokS: Double,
    val decodeTokS: Double,
    val peakRssMb: Double,
    val expertLoads: Long,
    val expertEvictions: Long,
    val residentPerLayer: List<Int>,
    val tokens: List<Int>,
) {
    companion object {
        /** Throws CosmoesException (status 4) for text that is not the library's statistics object. */
        fun parse(json: String): Stats = try {
            val o = JSONObject(json)
            Stats(json, o.getDouble("ttft_ms"), o.getDouble("prefill_tok_s"), o.getDouble("decode_tok_s"),
                o.getDouble("peak_rss_mb"), o.getLong("expert_loads"), o.getLong("expert_evictions"),
                ints(o.optJSONArray("resident_per_layer")), ints(o.getJSONArray("tokens")))
        } catch (e: JSONException) {
            throw CosmoesException("unreadable statistics JSON: ${e.message}", CosmoesException.RUNTIME_ERROR)
        }

        private fun ints(a: JSONArray?): List<Int> = if (a == null) emptyList() else List(a.length()) { a.getInt(it) }
    }
}
