// Writes the Halibut wire-format test vectors: for each case, the BSON of
// MessageEnvelope<object> {Message = RequestMessage|ResponseMessage|null}
// exactly as Halibut's MessageSerializer produces it before DEFLATE, plus an
// indented JSON rendering (for people) and manifest.json (for tests).
//
// The JsonSerializerSettings mirror Halibut's MessageSerializerBuilder:
// Formatting.None, TypeNameHandling.Auto, simple assembly names,
// DateFormatHandling.IsoDateFormat. DataStreams are captured with an
// OnSerialized callback, as HalibutContractResolver does, so the manifest
// lists them in the order their payloads would follow the message.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.Serialization;
using System.Runtime.Serialization.Formatters;
using Halibut;
using Halibut.Transport.Protocol;
using Newtonsoft.Json;
using Newtonsoft.Json.Bson;
using Newtonsoft.Json.Serialization;
using Octopus.Tentacle.Contracts;
using Octopus.Tentacle.Contracts.Capabilities;
using Octopus.Tentacle.Contracts.ScriptServiceV2;

// The envelope is a private generic class inside Halibut's MessageSerializer;
// it is the root object, so its own name never reaches the wire.
public class MessageEnvelope
{
    public object Message { get; set; }
}

public class CapturingResolver : DefaultContractResolver
{
    public readonly List<DataStream> Captured = new List<DataStream>();

    protected override JsonContract CreateContract(Type objectType)
    {
        var contract = base.CreateContract(objectType);
        if (objectType == typeof(DataStream))
        {
            contract.OnSerializedCallbacks.Add((o, ctx) => Captured.Add((DataStream)o));
        }
        return contract;
    }
}

// What Tentacle's WithLegacyContractSupport() does to type names
// (Octopus.Tentacle.Contracts/Legacy/*: NamespaceMappingSerializationBinderDecorator
// inside AssemblyMappingSerializationBinderDecorator): the twelve original V1
// contract types are written under their pre-rename names
// "Octopus.Shared.Contracts.X, Octopus.Shared", and both spellings are read.
// Both the Tentacle and the server side of Tentacle's own integration tests
// are built with it, so this is what V1 messages look like on the wire.
public class LegacyContractBinder : DefaultSerializationBinder
{
    const string LegacyNamespace = "Octopus.Shared.Contracts";
    const string LegacyAssembly = "Octopus.Shared";
    const string Namespace = "Octopus.Tentacle.Contracts";
    static readonly string[] Remapped =
    {
        "CancelScriptCommand", "CompleteScriptCommand", "IFileTransferService", "IScriptService", "ScriptFile",
        "ScriptIsolationLevel", "ScriptStatusRequest", "ScriptStatusResponse", "ScriptTicket", "ScriptType",
        "StartScriptCommand", "UploadResult",
    };

    static bool ShouldRemap(string fullTypeName)
    {
        foreach (var name in Remapped)
        {
            if (fullTypeName == LegacyNamespace + "." + name || fullTypeName == Namespace + "." + name) return true;
        }
        return false;
    }

    public override void BindToName(Type serializedType, out string assemblyName, out string typeName)
    {
        base.BindToName(serializedType, out assemblyName, out typeName);
        if (ShouldRemap(typeName)) typeName = typeName.Replace(Namespace, LegacyNamespace);
        var contractsAssembly = typeof(ScriptTicket).Assembly.FullName;
        if (ShouldRemap(typeName) && assemblyName != null) assemblyName = assemblyName.Replace(contractsAssembly, LegacyAssembly);
    }
}

public static class Generate
{
    static readonly List<string> Manifest = new List<string>();

    // Cleared for the one vector that shows the current (non-legacy) names.
    static bool legacyNames = true;

    static JsonSerializerSettings Settings(CapturingResolver resolver, Formatting formatting)
    {
        return new JsonSerializerSettings
        {
            Binder = legacyNames ? new LegacyContractBinder() : new DefaultSerializationBinder(),
            Formatting = formatting,
            ContractResolver = resolver,
            TypeNameHandling = TypeNameHandling.Auto,
            TypeNameAssemblyFormat = FormatterAssemblyStyle.Simple,
            DateFormatHandling = DateFormatHandling.IsoDateFormat,
        };
    }

    static void Write(string outDir, string name, string description, object message)
    {
        var resolver = new CapturingResolver();
        var serializer = JsonSerializer.Create(Settings(resolver, Formatting.None));
        var envelope = new MessageEnvelope { Message = message };
        var buffer = new MemoryStream();
        using (var bson = new BsonWriter(buffer))
        {
            serializer.Serialize(bson, envelope);
        }
        File.WriteAllBytes(Path.Combine(outDir, name + ".bson"), buffer.ToArray());

        var text = JsonConvert.SerializeObject(envelope, Settings(new CapturingResolver(), Formatting.Indented));
        File.WriteAllText(Path.Combine(outDir, name + ".json"), text.Replace("\r\n", "\n") + "\n");

        var streams = new List<string>();
        foreach (var s in resolver.Captured)
        {
            streams.Add("{\"id\": \"" + s.Id + "\", \"length\": " + s.Length + "}");
        }
        Manifest.Add("  {\"name\": " + JsonConvert.ToString(name)
            + ", \"description\": " + JsonConvert.ToString(description)
            + ", \"dataStreams\": [" + string.Join(", ", streams) + "]}");
    }

    static Guid G(string s) { return new Guid(s); }

    static DataStream Stream(string id, long length) { return new DataStream { Id = G(id), Length = length }; }

    static RequestMessage Request(string service, string method, int counter, ServiceEndPoint endpoint, params object[] args)
    {
        return new RequestMessage
        {
            Id = service + "::" + method + "Async[" + counter + "] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d",
            ActivityId = G("3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
            Destination = endpoint,
            ServiceName = service,
            MethodName = method,
            Params = args,
        };
    }

    static ResponseMessage Response(string service, string method, int counter, object result)
    {
        return new ResponseMessage
        {
            Id = service + "::" + method + "Async[" + counter + "] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d",
            Result = result,
        };
    }

    static List<ProcessOutput> SampleLogs()
    {
        return new List<ProcessOutput>
        {
            new ProcessOutput(ProcessOutputSource.StdOut, "Hello from bash",
                new DateTimeOffset(2024, 2, 29, 23, 59, 58, 123, TimeSpan.Zero)),
            new ProcessOutput(ProcessOutputSource.StdErr, "warning: \u00e9t\u00e9 \u2603",
                new DateTimeOffset(2024, 3, 1, 10, 0, 0, 5, TimeSpan.FromHours(10))),
            new ProcessOutput(ProcessOutputSource.Debug, "",
                new DateTimeOffset(1969, 12, 31, 23, 59, 59, 999, TimeSpan.FromMinutes(-330))),
        };
    }

    public static int Main(string[] args)
    {
        var outDir = args.Length > 0 ? args[0] : ".";
        Directory.CreateDirectory(outDir);

        var octopusEndpoint = new ServiceEndPoint(new Uri("https://tentacle.example.com:10933/"),
            "A1B2C3D4E5F60718293A4B5C6D7E8F9012345678", null);
        var proxiedEndpoint = new ServiceEndPoint(new Uri("https://10.0.0.5:10933/"),
            "0123456789ABCDEF0123456789ABCDEF01234567",
            new ProxyDetails("proxy.local", 3128, Halibut.Transport.Proxy.ProxyType.HTTP, "user", null));
        var ticket = new ScriptTicket("20240229235958-1234-7");
        var v2Ticket = new ScriptTicket("kq3Zb7ZlT0ur2x7a9bQwQ");

        // ---- IScriptService (V1)
        var start = new StartScriptCommand("echo hello\r\nexit 0", ScriptIsolationLevel.FullIsolation,
            new TimeSpan(1, 2, 3, 4, 500), "RunningScript", new[] { "-Verbose", "a b", "" }, "ServerTasks-1234");
        start.Scripts.Add(ScriptType.Bash, "#!/bin/bash\necho hello");
        start.Scripts.Add(ScriptType.PowerShell, "Write-Host hello");
        start.Files.Add(new ScriptFile("package.nupkg", Stream("11111111-2222-3333-4444-555555555555", 5000000000L), null));
        start.Files.Add(new ScriptFile("secrets.json", Stream("aabbccdd-eeff-0011-2233-445566778899", 42), "s3cr3t"));
        Write(outDir, "v1_start_script_request", "IScriptService.StartScript with scripts, files (2 DataStreams) and an endpoint as Octopus Server sends it",
            Request("IScriptService", "StartScript", 1, octopusEndpoint, start));

        var startMinimal = new StartScriptCommand("", ScriptIsolationLevel.NoIsolation, TimeSpan.Zero, null, new string[0], null);
        Write(outDir, "v1_start_script_minimal_request", "IScriptService.StartScript with empty collections, null optionals and a null endpoint",
            Request("IScriptService", "StartScript", 2, null, startMinimal));
        Write(outDir, "v1_start_script_response", "ScriptTicket result",
            Response("IScriptService", "StartScript", 1, ticket));

        Write(outDir, "v1_get_status_request", "IScriptService.GetStatus",
            Request("IScriptService", "GetStatus", 3, octopusEndpoint, new ScriptStatusRequest(ticket, 0)));
        Write(outDir, "v1_get_status_response", "ScriptStatusResponse, running, three log lines with offsets",
            Response("IScriptService", "GetStatus", 3,
                new ScriptStatusResponse(ticket, ProcessState.Running, 0, SampleLogs(), 3)));
        Write(outDir, "v1_cancel_script_request", "IScriptService.CancelScript",
            Request("IScriptService", "CancelScript", 4, octopusEndpoint, new CancelScriptCommand(ticket, 3)));
        Write(outDir, "v1_cancel_script_response", "ScriptStatusResponse, complete with the Canceled exit code, no logs",
            Response("IScriptService", "CancelScript", 4,
                new ScriptStatusResponse(ticket, ProcessState.Complete, -43, new List<ProcessOutput>(), 3)));
        Write(outDir, "v1_complete_script_request", "IScriptService.CompleteScript with a sequence above 2**31",
            Request("IScriptService", "CompleteScript", 5, octopusEndpoint, new CompleteScriptCommand(ticket, 3000000000L)));
        Write(outDir, "v1_complete_script_response", "ScriptStatusResponse, pending, int.MinValue exit code, negative sequence",
            Response("IScriptService", "CompleteScript", 5,
                new ScriptStatusResponse(ticket, ProcessState.Pending, int.MinValue, new List<ProcessOutput>
                {
                    new ProcessOutput(ProcessOutputSource.StdOut, "line\twith\ttabs\r\n",
                        new DateTimeOffset(9999, 12, 31, 23, 59, 59, 999, TimeSpan.Zero)),
                }, -1)));

        // ---- IScriptServiceV2
        var startV2 = new StartScriptCommandV2("Write-Host hi", ScriptIsolationLevel.FullIsolation,
            TimeSpan.FromSeconds(-1), "Mutex-A", new[] { "x" }, "ServerTasks-99", v2Ticket,
            new TimeSpan(0, 0, 0, 5, 250));
        startV2.Scripts.Add(ScriptType.PowerShell, "Write-Host hi");
        startV2.Files.Add(new ScriptFile("data.bin", Stream("00000000-0000-0000-0000-000000000001", 0), null));
        Write(outDir, "v2_start_script_request", "IScriptServiceV2.StartScript with a negative mutex timeout, a duration and one file",
            Request("IScriptServiceV2", "StartScript", 6, proxiedEndpoint, startV2));
        var startV2Minimal = new StartScriptCommandV2("echo", ScriptIsolationLevel.NoIsolation,
            TimeSpan.FromMinutes(10), null, new string[0], "ServerTasks-100", v2Ticket, null);
        Write(outDir, "v2_start_script_minimal_request", "IScriptServiceV2.StartScript with a null duration and a null endpoint",
            Request("IScriptServiceV2", "StartScript", 7, null, startV2Minimal));
        Write(outDir, "v2_start_script_response", "ScriptStatusResponseV2, running, with logs",
            Response("IScriptServiceV2", "StartScript", 6,
                new ScriptStatusResponseV2(v2Ticket, ProcessState.Running, 0, SampleLogs(), 3)));
        Write(outDir, "v2_get_status_request", "IScriptServiceV2.GetStatus",
            Request("IScriptServiceV2", "GetStatus", 8, octopusEndpoint, new ScriptStatusRequestV2(v2Ticket, 3)));
        Write(outDir, "v2_get_status_response", "ScriptStatusResponseV2, complete, exit code 1, no logs",
            Response("IScriptServiceV2", "GetStatus", 8,
                new ScriptStatusResponseV2(v2Ticket, ProcessState.Complete, 1, new List<ProcessOutput>(), 9223372036854775807L)));
        Write(outDir, "v2_cancel_script_request", "IScriptServiceV2.CancelScript",
            Request("IScriptServiceV2", "CancelScript", 9, octopusEndpoint, new CancelScriptCommandV2(v2Ticket, 12)));
        Write(outDir, "v2_cancel_script_response", "ScriptStatusResponseV2, complete with the Canceled exit code",
            Response("IScriptServiceV2", "CancelScript", 9,
                new ScriptStatusResponseV2(v2Ticket, ProcessState.Complete, -43, new List<ProcessOutput>(), 12)));
        Write(outDir, "v2_complete_script_request", "IScriptServiceV2.CompleteScript",
            Request("IScriptServiceV2", "CompleteScript", 10, octopusEndpoint, new CompleteScriptCommandV2(v2Ticket)));
        Write(outDir, "v2_complete_script_response", "void method: null result",
            Response("IScriptServiceV2", "CompleteScript", 10, null));

        // ---- IFileTransferService
        Write(outDir, "upload_file_request", "IFileTransferService.UploadFile: a string and a DataStream in object[] params",
            Request("IFileTransferService", "UploadFile", 11, octopusEndpoint,
                "C:\\Octopus\\Files\\pkg.zip", Stream("f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f", 1234567)));
        Write(outDir, "upload_file_response", "UploadResult",
            Response("IFileTransferService", "UploadFile", 11,
                new UploadResult("/home/octopus/Files/pkg.zip", "da39a3ee5e6b4b0d3255bfef95601890afd80709", 1234567)));
        Write(outDir, "download_file_request", "IFileTransferService.DownloadFile",
            Request("IFileTransferService", "DownloadFile", 12, octopusEndpoint, "Files/pkg.zip"));
        Write(outDir, "download_file_response", "DataStream result (a DataStream in the object-typed result slot)",
            Response("IFileTransferService", "DownloadFile", 12, Stream("01234567-89ab-cdef-0123-456789abcdef", 17)));
        Write(outDir, "download_file_missing_response", "DownloadFile of a missing file: null result",
            Response("IFileTransferService", "DownloadFile", 13, null));

        // ---- ICapabilitiesServiceV2
        Write(outDir, "get_capabilities_request", "ICapabilitiesServiceV2.GetCapabilities: empty params",
            Request("ICapabilitiesServiceV2", "GetCapabilities", 14, octopusEndpoint));
        Write(outDir, "get_capabilities_response", "CapabilitiesResponseV2",
            Response("ICapabilitiesServiceV2", "GetCapabilities", 14,
                new CapabilitiesResponseV2(new List<string> { "IScriptService", "IFileTransferService", "IScriptServiceV2" })));

        // ---- errors and the null envelope
        Write(outDir, "error_response", "ServerError with every field set",
            new ResponseMessage
            {
                Id = "IScriptServiceV2::GetStatusAsync[15] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d",
                Error = new ServerError
                {
                    Message = "Service not found: IScriptServiceV3",
                    Details = "Halibut.Exceptions.ServiceNotFoundHalibutClientException: Service not found\n   at Halibut.ServiceModel.ServiceInvoker.Invoke()",
                    HalibutErrorType = "Halibut.Exceptions.ServiceNotFoundHalibutClientException",
                    ConnectionState = 2,
                },
            });
        Write(outDir, "error_minimal_response", "ServerError with only a message, as ResponseMessage.FromError builds it",
            new ResponseMessage
            {
                Id = "IScriptService::StartScriptAsync[16] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d",
                Error = new ServerError { Message = "boom" },
            });
        Write(outDir, "null_envelope", "MessageEnvelope with a null Message (the polling keep-alive)", null);
        FailureVectors.Add((name, description, message) => Write(outDir, name, description, message));
        EncryptionVectors.Write(outDir);

        // ---- the same V1 messages with the current names, which Tentacle also reads
        legacyNames = false;
        Write(outDir, "v1_get_status_request_current_names", "IScriptService.GetStatus as written without WithLegacyContractSupport()",
            Request("IScriptService", "GetStatus", 3, octopusEndpoint, new ScriptStatusRequest(ticket, 0)));
        Write(outDir, "v1_start_script_response_current_names", "ScriptTicket result as written without WithLegacyContractSupport()",
            Response("IScriptService", "StartScript", 1, ticket));
        legacyNames = true;

        // ---- probes: how Json.NET writes primitives and collections in object slots
        Write(outDir, "probe_object_primitives", "object[] params holding primitives: no $type on any of them",
            Request("IProbe", "Primitives", 17, null,
                "text", 5L, 7, true, G("00112233-4455-6677-8899-aabbccddeeff"), ScriptType.Bash,
                TimeSpan.FromDays(-1.5), new DateTimeOffset(2001, 2, 3, 4, 5, 6, 7, TimeSpan.FromHours(-7)), 1.5, null));
        Write(outDir, "probe_object_collections", "object[] params holding collections: {$type, $values} for lists and arrays, $type on dictionaries",
            Request("IProbe", "Collections", 18, null,
                new[] { "a", "b" },
                new List<string> { "c" },
                new List<ScriptTicket> { ticket },
                new Dictionary<ScriptType, string> { { ScriptType.Bash, "x" } }));

        File.WriteAllText(Path.Combine(outDir, "manifest.json"), "[\n" + string.Join(",\n", Manifest) + "\n]\n");
        Console.WriteLine("wrote " + Manifest.Count + " vectors to " + outDir);
        return 0;
    }
}
